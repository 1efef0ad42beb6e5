# Kubernetes on a local kind cluster: create it with its add-ons, develop with skaffold,
# deploy with helm, and port-forward the UIs. These targets need internet access and the
# tools each one names; docs/kubernetes.md walks through them.

K8S_CLUSTER ?= fastapi-redis-mini
K8S_CONTEXT ?= kind-$(K8S_CLUSTER)
K8S_NAMESPACE ?= fastapi-redis-mini
K8S_RELEASE ?= frm
# More `helm upgrade` arguments for make deploy, e.g. DEPLOY_ARGS="--set redis.mode=cluster".
DEPLOY_ARGS ?=
# make smoke checks the release make deploy installed, whose images kind holds.
SMOKE_RELEASE ?= $(K8S_RELEASE)
SMOKE_NAMESPACE ?= $(K8S_NAMESPACE)
K8S_CHART := charts/fastapi-redis-mini
# How the worker scales: keda, prometheus-adapter or cpu. KEDA and prometheus-adapter both
# serve the external metrics API, so a cluster gets one of them.
SCALER ?= keda

# The add-on charts, pinned.
METRICS_SERVER_VERSION := 3.12.2
KUBE_PROMETHEUS_STACK_VERSION := 69.4.1
KEDA_VERSION := 2.16.1
PROMETHEUS_ADAPTER_VERSION := 4.11.0

METRICS_SERVER_REPO := https://kubernetes-sigs.github.io/metrics-server/
PROMETHEUS_COMMUNITY_REPO := https://prometheus-community.github.io/helm-charts
KEDA_REPO := https://kedacore.github.io/charts

K8S_HELM := helm --kube-context $(K8S_CONTEXT)
K8S_KUBECTL := kubectl --context $(K8S_CONTEXT)
K8S_EMPTY :=
K8S_COMMA := ,
K8S_SKAFFOLD_PROFILES = $(subst $(K8S_EMPTY) $(K8S_EMPTY),$(K8S_COMMA),$(strip $(filter-out cpu,$(SCALER)) loadtest))

# Stop with one line naming every tool the target needs and cannot find.
define require-tools
@missing=""; for tool in $(1); do command -v "$$tool" >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
if [ -n "$$missing" ]; then echo "make $@: missing$$missing (needs: $(1)); see docs/kubernetes.md" >&2; exit 1; fi
endef

define require-scaler
@case "$(SCALER)" in keda|prometheus-adapter|cpu) ;; \
*) echo "make $@: SCALER must be keda, prometheus-adapter or cpu, not '$(SCALER)'" >&2; exit 1;; esac
endef

.PHONY: cluster-up cluster-down dev deploy loadtest-ui grafana smoke

cluster-up: ## Create the kind cluster with metrics-server, Prometheus+Grafana and the SCALER (keda|prometheus-adapter|cpu)
	$(call require-tools,kind helm kubectl)
	$(call require-scaler)
	kind get clusters | grep -qx '$(K8S_CLUSTER)' || kind create cluster --name '$(K8S_CLUSTER)' --config kind-config.yaml
	$(K8S_HELM) upgrade --install metrics-server metrics-server --repo $(METRICS_SERVER_REPO) \
		--version $(METRICS_SERVER_VERSION) -n kube-system -f k8s/metrics-server-values.yaml --wait
	$(K8S_HELM) upgrade --install kube-prometheus-stack kube-prometheus-stack --repo $(PROMETHEUS_COMMUNITY_REPO) \
		--version $(KUBE_PROMETHEUS_STACK_VERSION) -n monitoring --create-namespace \
		-f k8s/kube-prometheus-stack-values.yaml --wait --timeout 10m
ifeq ($(SCALER),keda)
	$(K8S_HELM) upgrade --install keda keda --repo $(KEDA_REPO) \
		--version $(KEDA_VERSION) -n keda --create-namespace -f k8s/keda-values.yaml --wait
endif
ifeq ($(SCALER),prometheus-adapter)
	$(K8S_HELM) upgrade --install prometheus-adapter prometheus-adapter --repo $(PROMETHEUS_COMMUNITY_REPO) \
		--version $(PROMETHEUS_ADAPTER_VERSION) -n monitoring -f k8s/prometheus-adapter-values.yaml --wait
endif

cluster-down: ## Delete the kind cluster and everything in it
	$(call require-tools,kind)
	kind delete cluster --name $(K8S_CLUSTER)

dev: ## skaffold dev on the kind cluster: build, load, deploy, port-forward api :8000, Locust :8089, Grafana :3000
	$(call require-tools,skaffold kind helm kubectl docker)
	$(call require-scaler)
	skaffold dev --kube-context $(K8S_CONTEXT) --profile $(K8S_SKAFFOLD_PROFILES)

# Each image is tagged with the first 12 hex digits of its own ID, a digest of its content (as
# skaffold tags local builds), so changed code gets a new tag and helm rolls the pods, and an
# unchanged build rolls nothing. A fixed tag with IfNotPresent kept the old code running.
deploy: ## Build the images, tag each by its content, load them into kind, helm upgrade --install (with Locust), helm test
	$(call require-tools,docker kind helm kubectl)
	$(call require-scaler)
	@set -euo pipefail; \
	for target in api worker; do \
		echo "+ docker build --quiet --file services/Dockerfile --target $$target ." >&2; \
		id=$$(docker build --quiet --file services/Dockerfile --target "$$target" .); \
		id=$${id##*sha256:}; \
		if [ -z "$$id" ]; then echo "make deploy: docker build printed no image ID for $$target" >&2; exit 1; fi; \
		declare "tag_$$target=$${id:0:12}"; \
		(set -x; docker tag "$$id" "fastapi-redis-mini-$$target:$${id:0:12}"); \
	done; \
	set -x; \
	kind load docker-image --name $(K8S_CLUSTER) \
		"fastapi-redis-mini-api:$$tag_api" "fastapi-redis-mini-worker:$$tag_worker"; \
	$(K8S_HELM) upgrade --install $(K8S_RELEASE) $(K8S_CHART) -n $(K8S_NAMESPACE) --create-namespace --wait \
		--set api.image.tag="$$tag_api" --set worker.image.tag="$$tag_worker" \
		--set worker.autoscaling.keda.enabled=$(if $(filter keda,$(SCALER)),true,false) \
		--set worker.autoscaling.prometheusAdapter.enabled=$(if $(filter prometheus-adapter,$(SCALER)),true,false) \
		--set loadtest.enabled=true \
		--set metrics.serviceMonitor.enabled=true --set metrics.prometheusRule.enabled=true \
		$(DEPLOY_ARGS)
	$(K8S_HELM) test $(K8S_RELEASE) -n $(K8S_NAMESPACE)

loadtest-ui: ## Port-forward the Locust web UI to http://localhost:8089
	$(call require-tools,kubectl)
	$(K8S_KUBECTL) -n $(K8S_NAMESPACE) port-forward svc/$(K8S_RELEASE)-fastapi-redis-mini-locust-master 8089:8089

grafana: ## Port-forward Grafana to http://localhost:3000 (admin / admin)
	$(call require-tools,kubectl)
	$(K8S_KUBECTL) -n monitoring port-forward svc/kube-prometheus-stack-grafana 3000:80

smoke: ## Check a release (make deploy's by default) on the current kube context: helm test, tasks, Locust, scale-out, drained queue (SMOKE_* settings)
	$(call require-tools,helm kubectl curl)
	SMOKE_RELEASE='$(SMOKE_RELEASE)' SMOKE_NAMESPACE='$(SMOKE_NAMESPACE)' tools/k8s/smoke.sh
