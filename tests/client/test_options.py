"""What a client does before and around its calls: its options from the environment,
addresses that can never work, a call after close(), and exceptions that cross processes."""

from __future__ import annotations

import pickle
import time
import uuid
from concurrent.futures import ProcessPoolExecutor

import pytest

from fastapi_redis_mini_client import (
    Client,
    ClientClosedError,
    RetryPolicy,
    ServiceUnreachableError,
    TaskClientError,
    TaskFailedError,
    TaskNotFoundError,
    WaitTimeoutError,
)

from .conftest import API_KEY, Connect, Stack

pytestmark = pytest.mark.slow


def test_the_client_reads_frm_url_and_frm_api_key(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRM_URL", stack.api.base_url)
    monkeypatch.setenv("FRM_API_KEY", API_KEY)
    with Client() as client:  # the api refuses a submit without a key: 401
        assert client.submit(f"from the environment {uuid.uuid4().hex}").task_id
    monkeypatch.setenv("FRM_URL", "http://127.0.0.1:1")
    with Client(stack.api.base_url, API_KEY) as client:  # the arguments win
        assert client.get(client.submit(f"explicit {uuid.uuid4().hex}").task_id)


@pytest.mark.parametrize(
    "url", ["http://[::1", "ftp://127.0.0.1:8000", "127.0.0.1:8000", "http://"]
)
def test_an_address_that_can_never_work_is_refused_at_once(url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        Client(url)


def test_an_unknown_host_is_not_retried(connect: Connect) -> None:
    client = connect("http://no-such-host.invalid", retry=RetryPolicy())  # 8 attempts
    began = time.monotonic()
    with pytest.raises(ServiceUnreachableError, match=r"in 1 attempt\(s\)"):
        client.get("f" * 32)
    assert time.monotonic() - began < 5  # no backoff at all; DNS gets a few seconds


def test_a_call_after_close_is_a_client_closed_error(stack: Stack) -> None:
    client = Client(stack.api.base_url, API_KEY)
    client.close()
    with pytest.raises(ClientClosedError, match="closed") as raised:
        client.get("f" * 32)
    assert isinstance(raised.value, TaskClientError)
    assert isinstance(raised.value, RuntimeError)  # what httpx raised before, for old handlers


def _raise(error: BaseException) -> None:
    raise error


def test_every_exception_crosses_a_process_boundary_with_its_attributes(
    stack: Stack,
) -> None:
    raised: list[TaskClientError] = []
    with Client(stack.api.base_url, API_KEY) as client:
        for provoke in (
            lambda: client.get("f" * 32),
            lambda: client.run(f"fail {uuid.uuid4().hex}", {"fail": True}, timeout=30),
            lambda: client.run(f"slow {uuid.uuid4().hex}", {"duration": 3}, timeout=0.2),
        ):
            with pytest.raises(TaskClientError) as caught:
                provoke()
            raised.append(caught.value)
    not_found, failed, timed_out = raised
    assert isinstance(not_found, TaskNotFoundError)
    assert isinstance(failed, TaskFailedError)
    assert isinstance(timed_out, WaitTimeoutError)
    for error in raised:
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 (bytes made just above)
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert vars(copy) == vars(error)
    # And through a real process pool, as multiprocessing users meet it.
    with ProcessPoolExecutor(max_workers=1) as pool:
        came_back = pool.submit(_raise, failed).exception(timeout=60)
    assert isinstance(came_back, TaskFailedError)
    assert came_back.task == failed.task


def test_the_client_drops_an_idle_connection_before_the_api_closes_it() -> None:
    # Reusing a connection as the server's keep-alive timer closes it fails the request
    # ("Server disconnected without sending a response"): the client must let go first,
    # with a margin for a busy event loop on either side.
    from fastapi_redis_mini.api.__main__ import KEEP_ALIVE_SECONDS
    from fastapi_redis_mini_client._core import DEFAULT_LIMITS

    assert DEFAULT_LIMITS.keepalive_expiry is not None
    assert DEFAULT_LIMITS.keepalive_expiry <= KEEP_ALIVE_SECONDS - 2
