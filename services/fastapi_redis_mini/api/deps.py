"""What a task route reads from its request: the tenant, the body, the query and headers.

These are plain functions that the routes call, not FastAPI dependencies. Solving declared
dependencies is most of FastAPI's own cost on a request, and on `POST /tasks` it cost more
than the Redis round trip did (see docs/BENCHMARKS.md). The body is parsed by pydantic's
JSON parser straight from the bytes, in one pass, rather than by `json.loads` first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine, Mapping
from inspect import Parameter, Signature
from typing import Annotated, Any, TypeVar

from fastapi import Body, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from .errors import InvalidFieldError, UnauthorizedError, UnsupportedMediaTypeError
from .state import ApiKeys

M = TypeVar("M", bound=BaseModel)

# pydantic's parser refuses JSON nested deeper than this; the fallback parser below refuses
# the same, well inside Python's own recursion limit, which json.loads would otherwise hit.
MAX_BODY_DEPTH = 200
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")
# A JSON string, and the colon after it when it is an object's key.
_STRING_TOKEN = re.compile(rb'"((?:[^"\\]|\\.)*)"(\s*:)?', re.DOTALL)


def tenant_of(request: Request, api_keys: ApiKeys) -> str:
    """The tenant a request acts for: "" when API_KEYS is unset, else that of its key."""
    if not api_keys.required:
        return ""
    presented = request.headers.get("x-api-key")
    if presented is not None:
        presented = presented.strip()
    else:
        authorization = request.headers.get("authorization", "")
        if authorization[:7].lower() == "bearer ":
            presented = authorization[7:].strip()
    tenant = api_keys.tenant(presented) if presented else None
    if tenant is None:
        raise UnauthorizedError()
    return tenant


def require_json(request: Request) -> None:
    """Only application/json, in UTF-8: a body other parsers may read otherwise is refused."""
    content_type = request.headers.get("content-type", "")
    media_type, _, parameters = content_type.partition(";")
    media_type = media_type.strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaTypeError(
            f"content-type must be application/json, not {media_type or 'missing'}"
        )
    charset = parameters.strip().lower().replace(" ", "")
    if charset and charset not in ("charset=utf-8", 'charset="utf-8"'):
        raise UnsupportedMediaTypeError(f"content-type: only charset=utf-8, not {charset}")


async def json_body(request: Request, model: type[M]) -> M:
    """The request body as `model`; a body that is not valid JSON or not valid `model` is a 422.

    The errors carry the same `("body", ...)` locations FastAPI gives a declared body, so they
    reach the client through the same handler and read the same way.
    """
    require_json(request)
    body = await request.body()
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as error:
        invalid_json = [item for item in error.errors() if item["type"] == "json_invalid"]
        if not invalid_json:
            raise _invalid(error, body) from None
        if "recursion limit" in str(invalid_json[0].get("ctx", {}).get("error", "")):
            raise InvalidFieldError("body", f"nested deeper than {MAX_BODY_DEPTH} levels") from None
        first = error
    else:
        if _may_repeat_a_key(body):
            _reject_duplicate_keys(body)
        return parsed
    # pydantic's parser refuses some text Python's accepts, such as a lone surrogate escape.
    # Reading it again with json lets the field checks name the field that holds it; json
    # recurses once per level, so the depth is checked first.
    if _nesting(body) > MAX_BODY_DEPTH:
        raise InvalidFieldError("body", f"nested deeper than {MAX_BODY_DEPTH} levels")
    try:
        # Decoded first: json.loads would also take UTF-16 and a byte order mark.
        data = json.loads(body.decode(), object_pairs_hook=_unique_keys)
    except DuplicateKeyError as error:
        raise InvalidFieldError(error.field, "duplicate key in the JSON object") from None
    except ValueError:
        raise _invalid(first, body) from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _invalid(error, body) from None


class DuplicateKeyError(ValueError):
    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return result


def _may_repeat_a_key(body: bytes) -> bool:
    """False when no object of a valid JSON text can repeat a key; True when one may.

    Scanned from the start, the string pattern matches the text's strings and nothing
    inside them, so the strings followed by a colon are exactly its keys. No key seen twice
    (in any object) and no escape in the text means no object repeats one; otherwise the
    exact check decides, since a key may recur in another object, or be spelled with an
    escape (`"a"` and `"\\u0061"` are one key).
    """
    if b"\\" in body:
        return True
    keys = [key for key, colon in _STRING_TOKEN.findall(body) if colon]
    return len(set(keys)) != len(keys)


def _reject_duplicate_keys(body: bytes) -> None:
    """Raise a 422 naming the key when an object of the body repeats one; other parsers
    (a proxy, an audit log) may read the first where pydantic took the last."""
    try:
        json.loads(body.decode(), object_pairs_hook=_unique_keys)
    except DuplicateKeyError as error:
        raise InvalidFieldError(error.field, "duplicate key in the JSON object") from None


def _nesting(body: bytes) -> int:
    """How deep arrays and objects nest in a JSON text, without parsing it (linear time)."""
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub(b"", body)):
        if bracket in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _invalid(error: ValidationError, body: bytes) -> RequestValidationError:
    errors: list[dict[str, Any]] = [
        {**item, "loc": ("body", *item["loc"])}
        for item in error.errors(include_url=False, include_input=False)
    ]
    return RequestValidationError(errors, body=body)


def validated(
    model: type[M],
    values: Mapping[str, Any],
    *location: str,
    context: Mapping[str, Any] | None = None,
) -> M:
    """`values` as `model`; otherwise a 422 naming the field, found at `location` ("query")."""
    try:
        return model.model_validate(values, context=context)
    except ValidationError as error:
        errors = [
            {**item, "loc": (*location, *item["loc"])}
            for item in error.errors(include_url=False, include_input=False)
        ]
        raise RequestValidationError(errors) from None


E = TypeVar("E", bound=Callable[..., Any])


def parses(
    *,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    headers: type[BaseModel] | None = None,
    **path: Any,
) -> Callable[[E], E]:
    """Document what a RequestRoute endpoint parses itself, from the models it parses with.

    FastAPI builds a route's OpenAPI entry from its endpoint's signature. This gives the
    endpoint the signature of what it parses (`path` maps each path parameter to its type), so
    the document references the very models, with their limits, in components/schemas. A
    RequestRoute calls the endpoint with the Request alone; the signature is only read.
    """
    declared = [
        *(Parameter(name, Parameter.KEYWORD_ONLY, annotation=Annotated[kind, Path()])
          for name, kind in path.items()),
        *([Parameter("query", Parameter.KEYWORD_ONLY, annotation=Annotated[query, Query()])]
          if query else []),
        *([Parameter("headers", Parameter.KEYWORD_ONLY, annotation=Annotated[headers, Header()])]
          if headers else []),
        *([Parameter("body", Parameter.KEYWORD_ONLY, annotation=Annotated[body, Body()])]
          if body else []),
    ]  # fmt: skip

    def document(endpoint: E) -> E:
        endpoint.__dict__["__signature__"] = Signature(declared)  # what inspect.signature reads
        return endpoint

    return document


def operation_id(route: APIRoute) -> str:
    """The endpoint's name (`submit_task`), which generated clients use for the call."""
    return route.name


class RequestRoute(APIRoute):
    """A documented route whose endpoint takes the Request and returns the Response itself.

    FastAPI still builds the route's OpenAPI entry from its response_model and openapi_extra,
    and errors raised in the endpoint still reach the app's handlers; only the per-request
    machinery the endpoint has no use for (solving dependencies, reading and validating the
    body, serialising a return value) is skipped.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint
        return endpoint
