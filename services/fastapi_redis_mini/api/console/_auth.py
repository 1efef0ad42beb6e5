"""Who may use the console: the admin key, as a Bearer header or as a session from the login
form, and the CSRF token every action of a session must carry.

A session is a signed cookie, `<expires>.<nonce>.<mac>`, with the MAC keyed by ADMIN_API_KEY:
nothing is stored, and changing the key ends every session. A session's CSRF token is a MAC
of the cookie, so a page can hold it and another site cannot learn it. A Bearer request
carries no ambient credential a third-party page could borrow, so it needs no token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request

from ..errors import ServiceError
from ..state import ApiKeys

COOKIE = "frm_console"
CSRF_FIELD = "csrf_token"
# A working day: long enough not to interrupt an incident, short enough that a cookie left on
# a shared machine lapses by the next one.
SESSION_SECONDS = 8 * 3600


class ConsoleUnauthorizedError(ServiceError):
    status_code, code = 401, "unauthorized"

    def __init__(self, message: str = "the console needs the admin key") -> None:
        super().__init__(message)


class ConsoleForbiddenError(ServiceError):
    status_code, code = 403, "forbidden"


@dataclass(frozen=True, slots=True)
class Access:
    """An admitted request: by a session cookie (with its CSRF token) or by a Bearer key."""

    csrf_token: str  # "" for a Bearer request
    by_session: bool


class ConsoleAuth:
    def __init__(self, admin_key: str, api_keys: ApiKeys) -> None:
        self._secret = admin_key.encode()
        self._admin_digest = hashlib.sha256(self._secret).digest()
        self._api_keys = api_keys

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def is_admin_key(self, presented: str) -> bool:
        candidate = hashlib.sha256(presented.encode()).digest()
        return hmac.compare_digest(candidate, self._admin_digest)

    def check_key(self, presented: str) -> None:
        """Raise 401 for a key that is no key here, 403 for a tenant's key."""
        if self.is_admin_key(presented):
            return
        if self._api_keys.required and self._api_keys.tenant(presented) is not None:
            raise ConsoleForbiddenError("an API key of API_KEYS cannot open the console")
        raise ConsoleUnauthorizedError("this is not the admin key")

    def new_session(self, now: float | None = None) -> str:
        expires = int((now or time.time()) + SESSION_SECONDS)
        body = f"{expires}.{secrets.token_hex(16)}"
        return f"{body}.{self._mac('session', body)}"

    def _valid_session(self, cookie: str) -> bool:
        body, _, mac = cookie.rpartition(".")
        expires = body.split(".", 1)[0]
        return (
            expires.isdigit()
            and int(expires) > time.time()
            and hmac.compare_digest(mac, self._mac("session", body))
        )

    def csrf_token(self, cookie: str) -> str:
        return self._mac("csrf", cookie)

    def admit(self, request: Request) -> Access:
        """The request's access, or 401 without the admin key and 403 with a tenant's key."""
        authorization = request.headers.get("authorization", "")
        if authorization[:7].lower() == "bearer ":
            self.check_key(authorization[7:].strip())
            return Access(csrf_token="", by_session=False)
        cookie = request.cookies.get(COOKIE, "")
        if cookie and self._valid_session(cookie):
            return Access(csrf_token=self.csrf_token(cookie), by_session=True)
        raise ConsoleUnauthorizedError()

    def check_csrf(self, access: Access, presented: str) -> None:
        """An action of a session must carry its token; 403 otherwise."""
        if access.by_session and not hmac.compare_digest(presented, access.csrf_token):
            raise ConsoleForbiddenError(f"{CSRF_FIELD}: missing or not this session's")
