# Observability: the Grafana dashboard generated from code, the alert rules and their tests.
DASHBOARD_JSON := charts/fastapi-redis-mini/files/grafana/overview.json
ALERT_RULES := charts/fastapi-redis-mini/files/prometheus/rules.yaml

.PHONY: dashboards rules-test observability-test

dashboards: $(VENV)/.synced ## Regenerate the Grafana overview dashboard JSON from tools/grafana_dashboard.py
	$(BIN)/python tools/grafana_dashboard.py --output $(DASHBOARD_JSON)

rules-test: $(VENV)/.synced ## Check and lint the alert rules, run their promtool tests and the on-call scenarios, check the Alertmanager example
	promtool check rules $(ALERT_RULES)
	promtool test rules tests/observability/rules_test.yaml
	amtool check-config k8s/alertmanager.yaml
	$(BIN)/pytest -q tests/observability/test_rules.py tests/observability/test_rules_lint.py \
		tests/observability/test_oncall_scenarios.py

observability-test: $(VENV)/.synced ## Run the observability tests (real Prometheus, api and worker)
	$(BIN)/pytest tests/observability
