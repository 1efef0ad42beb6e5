# Container images (services/Dockerfile) and the compose stack (compose.yaml).
# Builds use the host network: the engine on CI runs without a bridge, and elsewhere it
# makes no difference. docs/containers.md has the details and the measured sizes.

IMAGE_TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
IMAGE_REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
PYTHON_IMAGE ?= python:3.11-slim-bookworm
DOCKER_BUILD_NETWORK ?= host
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

IMAGE_BUILD = docker build --network $(DOCKER_BUILD_NETWORK) --file services/Dockerfile \
	--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) --build-arg REVISION=$(IMAGE_REVISION)

.PHONY: images compose-up compose-down

images: ## Build the api and worker images, tagged with the git commit (fastapi-redis-mini-{api,worker}:<short sha>)
	$(IMAGE_BUILD) --target api --tag fastapi-redis-mini-api:$(IMAGE_TAG) .
	$(IMAGE_BUILD) --target worker --tag fastapi-redis-mini-worker:$(IMAGE_TAG) .
	@for image in fastapi-redis-mini-api:$(IMAGE_TAG) fastapi-redis-mini-worker:$(IMAGE_TAG); do \
		docker image inspect --format "$$image {{.Size}} bytes" "$$image"; done

compose-up: images ## Run api, worker and Redis with docker compose on the images just built (/docs on localhost:8000)
	IMAGE_TAG=$(IMAGE_TAG) $(COMPOSE) up

compose-down: ## Stop the compose stack; Redis keeps its data in the redis-data volume
	$(COMPOSE) down
