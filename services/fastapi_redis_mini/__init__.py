"""fastapi-redis-mini: a task service for slow, inference-style jobs on Redis Streams."""

__version__ = "0.1.0"
