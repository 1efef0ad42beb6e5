"""The api's dependencies, declared once as Annotated aliases.

They are all `async def`: FastAPI runs a plain `def` dependency in its thread pool, a hand-off
that cost more than the work each of these does.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from ..core.queue import TaskQueue
from ..core.settings import Settings
from .errors import UnauthorizedError, UnsupportedMediaTypeError


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_queue(request: Request) -> TaskQueue:
    queue: TaskQueue = request.app.state.queue
    return queue


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def get_scope(request: Request) -> str:
    """The tenant a request acts for: "" when API_KEYS is unset, else a digest of its key.

    Keys are compared as SHA-256 digests with hmac.compare_digest against every configured key,
    so neither the comparison nor the loop leaks which key matched, or how much of one did.
    The headers are read here rather than declared as parameters: with API_KEYS unset, a
    request pays nothing for them.
    """
    digests: tuple[bytes, ...] = request.app.state.api_key_digests
    if not digests:
        return ""
    presented = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization", "")
    if presented is None and authorization[:7].lower() == "bearer ":
        presented = authorization[7:].strip()
    if not presented:
        raise UnauthorizedError()
    candidate = _digest(presented)
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(candidate, digest)
    if not matched:
        raise UnauthorizedError()
    return candidate.hex()[:16]


async def require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaTypeError(
            f"content-type must be application/json, not {media_type or 'missing'}"
        )


SettingsDep = Annotated[Settings, Depends(get_settings)]
QueueDep = Annotated[TaskQueue, Depends(get_queue)]
ScopeDep = Annotated[str, Depends(get_scope)]
