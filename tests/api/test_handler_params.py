"""Handlers own their parameters: the api checks params with the Params model TASK_HANDLER
declares, and applies only its generic size and depth limits to a handler without one."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from fastapi_redis_mini.core.handlers import SimulateParams, handler_params
from fastapi_redis_mini_harness.processes import service_env

from ..support import REPO_ROOT
from ..support.handlers import TranslateParams
from .conftest import ClientFactory

TRANSLATOR = "tests.support.handlers:Translator"


async def submit(client: httpx.AsyncClient, params: object) -> httpx.Response:
    return await client.post("/tasks", json={"prompt": "hello", "params": params})


def test_a_handler_factory_declares_its_params() -> None:
    assert handler_params("simulate") is SimulateParams
    assert handler_params(TRANSLATOR) is TranslateParams
    assert handler_params("tests.support.handlers:hang") is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("no-such-model", "unknown handler 'no-such-model'"),
        ("tests.support.missing:load", "cannot load"),
        ("tests.support.handlers:NotAModel", "Params that is not a pydantic model"),
    ],
)
def test_a_handler_whose_params_cannot_be_read_is_named(name: str, problem: str) -> None:
    with pytest.raises(LookupError, match=f"^TASK_HANDLER: .*{problem}"):
        handler_params(name)


async def test_the_built_in_handlers_params_are_checked_with_its_model(
    make_client: ClientFactory,
) -> None:
    async with make_client(worker=False, max_task_duration=2) as client:
        cases = {
            "params.duration: Input should be a valid number": {"duration": "soon"},
            "params.duration: Input should be greater than or equal to 0": {"duration": -1},
            "params.duration: Value error, must be at most MAX_TASK_DURATION (2 seconds)": {
                "duration": 2.5
            },
            "params.fail: Input should be a valid boolean": {"fail": "yes"},
            "params.model: Input should be a valid string": {"model": 7},
        }
        for message, params in cases.items():
            response = await submit(client, params)
            assert response.status_code == 422, params
            assert response.json()["error"]["message"] == message
        # Keys the model does not name are the client's own, and part of the signature.
        accepted = await submit(client, {"duration": 2, "fail": False, "colour": "red"})
        assert accepted.status_code == 202


async def test_a_handlers_own_params_replace_the_simulators(make_client: ClientFactory) -> None:
    async with make_client(worker=False, task_handler=TRANSLATOR) as client:
        wrong = await submit(client, {"target": "xx"})
        assert wrong.status_code == 422
        assert wrong.json()["error"]["message"].startswith("params.target: ")
        extra = await submit(client, {"target": "de", "duration": 1})
        assert extra.json()["error"]["message"].startswith("params.duration: Extra inputs")
        # A model that needs a parameter is asked about a submit without params too.
        for body in ({"prompt": "hello", "params": {}}, {"prompt": "hello"}):
            missing = await client.post("/tasks", json=body)
            assert missing.status_code == 422, body
            assert missing.json()["error"]["message"] == "params.target: Field required"
        assert (await submit(client, {"target": "fr"})).status_code == 202


async def test_a_handler_without_params_gets_only_the_generic_limits(
    make_client: ClientFactory,
) -> None:
    async with make_client(
        worker=False, task_handler="tests.support.handlers:hang", max_params_depth=2
    ) as client:
        # The simulator would refuse this duration; this handler declares nothing about it.
        assert (await submit(client, {"duration": "soon"})).status_code == 202
        too_deep = await submit(client, {"a": {"b": {"c": 1}}})
        assert too_deep.status_code == 422
        assert too_deep.json()["error"]["message"] == "params: nested deeper than 2"


@pytest.mark.slow
def test_an_api_that_cannot_load_the_handler_stops_naming_it() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "fastapi_redis_mini.api"],
        env=service_env("redis://127.0.0.1:1/0", TASK_HANDLER="tests.support.missing:load"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode != 0
    assert "invalid configuration: TASK_HANDLER: cannot load" in completed.stderr
    assert "Traceback" not in completed.stderr
