"""Python client of the fastapi-redis-mini task service: submit, wait and retry safely.

from fastapi_redis_mini_client import Client

with Client("http://127.0.0.1:8000") as client:
    result = client.run("summarise the design", {"duration": 2}, timeout=60)
"""

from ._core import RetryPolicy
from .client import AsyncClient, Client
from .errors import (
    APIError,
    BacklogFullError,
    ClientClosedError,
    ConflictError,
    IdempotencyKeyReusedError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PoolTimeoutError,
    RateLimitedError,
    RedisUnavailableError,
    RequestRefusedError,
    ServerError,
    ServiceUnavailableError,
    ServiceUnreachableError,
    TaskCancelledError,
    TaskClientError,
    TaskEndedError,
    TaskExpiredError,
    TaskFailedError,
    TaskNotFoundError,
    TooManyUnfinishedError,
    UnauthorizedError,
    UnexpectedResponseError,
    UnsupportedMediaTypeError,
    WaitTimeoutError,
)
from .events import TaskEvent
from .models import Priority, Schedule, Task, TaskStatus
from .webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "APIError",
    "AsyncClient",
    "BacklogFullError",
    "Client",
    "ClientClosedError",
    "ConflictError",
    "IdempotencyKeyReusedError",
    "InternalServerError",
    "InvalidRequestError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PoolTimeoutError",
    "Priority",
    "RateLimitedError",
    "RedisUnavailableError",
    "RequestRefusedError",
    "RetryPolicy",
    "Schedule",
    "ServerError",
    "ServiceUnavailableError",
    "ServiceUnreachableError",
    "Task",
    "TaskCancelledError",
    "TaskClientError",
    "TaskEndedError",
    "TaskEvent",
    "TaskExpiredError",
    "TaskFailedError",
    "TaskNotFoundError",
    "TaskStatus",
    "TooManyUnfinishedError",
    "UnauthorizedError",
    "UnexpectedResponseError",
    "UnsupportedMediaTypeError",
    "WaitTimeoutError",
    "WebhookVerificationError",
    "verify_webhook",
]
