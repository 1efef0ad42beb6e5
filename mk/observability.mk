# Observability: the Grafana dashboard generated from code, the alert rules and their tests.
DASHBOARD_JSON := charts/fastapi-redis-mini/files/grafana/overview.json
ALERT_RULES := charts/fastapi-redis-mini/files/prometheus/rules.yaml

.PHONY: dashboards rules-test observability-test

dashboards: $(VENV)/.synced ## Regenerate the Grafana overview dashboard JSON from tools/grafana_dashboard.py
	$(BIN)/python tools/grafana_dashboard.py --output $(DASHBOARD_JSON)

rules-test: ## Check the Prometheus alert rules and run their promtool unit tests
	promtool check rules $(ALERT_RULES)
	promtool test rules tests/observability/rules_test.yaml

observability-test: $(VENV)/.synced ## Run the observability tests (real Prometheus, api and worker)
	$(BIN)/pytest tests/observability
