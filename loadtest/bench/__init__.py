"""The benchmark and its instruments, run as modules from the repository root:

    python -m loadtest.bench              # make bench: worker vs arq and SAQ, api vs a bare app
    python -m loadtest.bench.profile      # make profile-worker, profile-api, flamegraph
    python -m loadtest.bench.api_ab       # make api-ab: CPU per request, in one process

Servers and processes come from the harness (`fastapi_redis_mini_harness`); what is here
is load and measurement.
"""
