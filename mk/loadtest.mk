# Load tests, the benchmark and the profilers. All traffic stays on 127.0.0.1.
LOCUSTFILE := loadtest/locustfile.py
LOADTEST_HOST ?= http://127.0.0.1:8000
LOADTEST_USERS ?= 50
LOADTEST_SPAWN_RATE ?= 10
LOADTEST_TIME ?= 60s
# Users finish the task they are waiting on, so the last tasks are not cut off mid-poll.
LOADTEST_STOP_TIMEOUT ?= 30
LOADTEST_REPORTS := reports/loadtest
BENCH_VENV := .venv-bench
BENCH_LOCK := loadtest/bench/requirements.lock
BENCH_ARGS ?=
PROFILE_ARGS ?=

.PHONY: loadtest loadtest-headless bench bench-quick bench-tools bench-lock profile-worker profile-api api-ab worker-ab flamegraph

loadtest: $(VENV)/.synced ## Locust web UI on http://127.0.0.1:8089 against LOADTEST_HOST (default: make run's api)
	$(BIN)/locust -f $(LOCUSTFILE) --host $(LOADTEST_HOST) --web-host 127.0.0.1 --web-port 8089

loadtest-headless: $(VENV)/.synced ## LOADTEST_USERS users for LOADTEST_TIME against LOADTEST_HOST; CSV + HTML under reports/loadtest
	mkdir -p $(LOADTEST_REPORTS)
	$(BIN)/locust -f $(LOCUSTFILE) --host $(LOADTEST_HOST) --headless \
		--users $(LOADTEST_USERS) --spawn-rate $(LOADTEST_SPAWN_RATE) --run-time $(LOADTEST_TIME) \
		--stop-timeout $(LOADTEST_STOP_TIMEOUT) \
		--csv $(LOADTEST_REPORTS)/locust --html $(LOADTEST_REPORTS)/locust.html --only-summary

# The peers (arq needs redis<6) live in their own venv, installed from a hashed lock.
$(BENCH_VENV)/.installed: $(BIN)/uv $(BENCH_LOCK)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BENCH_VENV)/bin/python --require-hashes -r $(BENCH_LOCK)
	@touch $@

bench-tools: ## Install Debian's wrk (the api load generator) when it is missing and we are root
	@command -v wrk >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq wrk; } || \
		{ echo "bench: install wrk (apt-get install -y wrk)"; exit 1; }

bench: $(VENV)/.synced $(BENCH_VENV)/.installed bench-tools ## Worker vs arq/SAQ, api vs bare FastAPI, end to end, scale, memory, cluster, scaleout; table + reports/bench/bench.{json,md}
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)

bench-quick: $(VENV)/.synced $(BENCH_VENV)/.installed bench-tools ## The same benchmark with small N (a smoke run, about two minutes)
	$(BIN)/python -m loadtest.bench --quick $(BENCH_ARGS)

bench-lock: $(BIN)/uv ## Re-resolve the benchmark peers' hashed lock from loadtest/bench/requirements.in
	cd loadtest/bench && ../../$(BIN)/uv pip compile --quiet --generate-hashes \
		--python-version 3.11 requirements.in -o requirements.lock

profile-worker: $(VENV)/.synced ## cProfile one worker draining 20k tasks: reports/profile/worker.prof + top hotspots (snakeviz opens it)
	$(BIN)/python -m loadtest.bench.profile worker $(PROFILE_ARGS)

profile-api: $(VENV)/.synced bench-tools ## cProfile one api process under wrk (PROFILE_ARGS=--endpoint post_hit|get): .prof + hotspots
	$(BIN)/python -m loadtest.bench.profile api $(PROFILE_ARGS)

api-ab: $(VENV)/.synced ## CPU per request of the api against the bare app, in one process (AB_ARGS=--endpoint hit|get, --gc default)
	$(BIN)/python -m loadtest.bench.api_ab $(AB_ARGS)

# The worker of WORKER_AB_BASE against this tree's, alternating drains on one Valkey, arq
# between them (AB_ARGS=--env READ_BATCH=50 sets one for this tree's worker only).
WORKER_AB_BASE ?= HEAD
worker-ab: $(VENV)/.synced $(BENCH_VENV)/.installed ## Drain rate of WORKER_AB_BASE's worker against this tree's, side by side in turns, with arq in every round
	$(BIN)/python -m loadtest.bench.worker_ab --base $(WORKER_AB_BASE) $(AB_ARGS)

flamegraph: $(VENV)/.synced bench-tools ## py-spy flame graphs of the worker and the api under load: reports/profile/*.svg
	$(BIN)/python -m loadtest.bench.profile worker --flamegraph $(PROFILE_ARGS)
	$(BIN)/python -m loadtest.bench.profile api --flamegraph $(PROFILE_ARGS)
