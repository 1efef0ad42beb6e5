"""frm-client, the installed console script, against the real api and worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from fastapi_redis_mini_client import Client
from fastapi_redis_mini_harness.polling import poll
from fastapi_redis_mini_harness.ports import free_port

from .conftest import API_KEY, Stack

pytestmark = pytest.mark.slow


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def error(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.stderr.strip().splitlines()[-1])["error"]
        return body


def script() -> str:
    found = shutil.which("frm-client", path=str(Path(sys.executable).parent))
    assert found is not None, "frm-client is not installed next to this Python (make setup)"
    return found


def env(url: str, api_key: str | None = API_KEY) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FRM_")}
    base["FRM_URL"] = url
    if api_key is not None:
        base["FRM_API_KEY"] = api_key
    return base


def frm(*args: str, url: str, api_key: str | None = API_KEY) -> Outcome:
    done = subprocess.run(
        [script(), *args], env=env(url, api_key), capture_output=True, text=True, timeout=60
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex}"


def test_submit_get_and_wait_print_the_task_and_exit_0(stack: Stack) -> None:
    url = stack.api.base_url
    submitted = frm("submit", unique("from the shell"), "--params", '{"duration": 0.3}', url=url)
    assert submitted.code == 0, submitted.stderr
    task_id = submitted.json["task_id"]
    assert submitted.json["status"] == "PENDING"

    read = frm("get", task_id, url=url)
    assert read.code == 0
    assert read.json["task_id"] == task_id

    waited = frm("wait", task_id, "--timeout", "20", url=url)
    assert waited.code == 0
    assert waited.json["status"] == "DONE"
    assert waited.json["result"]["model"] == "sim-1"


def test_watch_prints_each_event_as_a_json_line_and_exits_by_the_status(stack: Stack) -> None:
    url = stack.api.base_url
    submitted = frm("submit", unique("watch me"), "--params", '{"duration": 0.5}', url=url)
    watched = frm("watch", submitted.json["task_id"], "--timeout", "20", url=url)
    assert watched.code == 0, watched.stderr
    lines = [json.loads(line) for line in watched.stdout.splitlines()]
    assert lines[-1]["event"] == "done"
    chunks = "".join(line["data"]["chunk"] for line in lines if line["event"] == "output")
    assert chunks == lines[-1]["data"]["result"]["output"]

    failed = frm("submit", unique("fail"), "--params", '{"fail": true}', url=url)
    assert frm("watch", failed.json["task_id"], url=url).code == 1


def test_run_prints_the_result_and_exits_0(stack: Stack) -> None:
    ran = frm("run", unique("run it"), "--params", '{"model": "m-9"}', url=stack.api.base_url)
    assert ran.code == 0, ran.stderr
    assert ran.json["model"] == "m-9"


def test_a_failed_task_exits_1(stack: Stack) -> None:
    url = stack.api.base_url
    ran = frm("run", unique("fail"), "--params", '{"fail": true}', "--timeout", "20", url=url)
    assert ran.code == 1
    assert ran.error["code"] == "task_failed"
    assert ran.json["status"] == "FAILED"

    # wait prints the task just as run does: on stdout.
    waited = frm("wait", ran.json["task_id"], url=url)
    assert waited.code == 1
    assert waited.json == ran.json


def test_a_scheduled_submit_and_an_expired_run_exit_7(stack: Stack) -> None:
    url = stack.api.base_url
    submitted = frm("submit", unique("low, later"), "--priority", "low", "--delay", "60",
                    url=url)  # fmt: skip
    assert submitted.code == 0
    read = frm("get", submitted.json["task_id"], url=url).json
    assert (read["status"], read["priority"]) == ("PENDING", "low")
    assert read["run_at"] > time.time() + 50
    # Due in 1 s and given 1 µs from then (see test_client's expired run).
    expired = frm("run", unique("too late"), "--delay", "1", "--deadline", "0.000001", url=url)
    assert expired.code == 7, expired.stderr
    assert expired.json["status"] == "EXPIRED"
    assert expired.error["code"] == "task_expired"
    refused = frm("submit", "x", "--run-at", "2020-01-01T00:00:00Z", url=url)
    assert refused.code == 5
    assert refused.error["message"].startswith("run_at: is in the past")


def test_cancel_exits_0_a_cancelled_task_3_and_a_second_cancel_5(stack: Stack) -> None:
    url = stack.api.base_url
    task_id = frm("submit", unique("cancel"), "--params", '{"duration": 10}', url=url).json[
        "task_id"
    ]
    cancelled = frm("cancel", task_id, url=url)
    assert cancelled.code == 0
    assert cancelled.json["task_id"] == task_id

    waited = frm("wait", task_id, "--timeout", "20", url=url)
    assert waited.code == 3
    assert waited.json["status"] == "CANCELLED"

    again = frm("cancel", task_id, url=url)
    assert again.code == 5
    assert again.error["code"] == "conflict"
    assert again.error["status"] == 409


def test_run_of_a_cancelled_task_exits_3(stack: Stack) -> None:
    url, key, prompt = stack.api.base_url, uuid.uuid4().hex, unique("cancel my run")
    params = {"duration": 10}
    command = [script(), "run", prompt, "--params", json.dumps(params), "--idempotency-key", key]
    with (
        subprocess.Popen(
            command, env=env(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as running,
        Client(url, API_KEY) as client,
    ):
        # The same key finds the run's task (or creates it first: one task either way).
        client.cancel(client.submit(prompt, params, idempotency_key=key).task_id)
        stdout, stderr = running.communicate(timeout=30)
    assert running.returncode == 3, stderr
    assert json.loads(stdout)["status"] == "CANCELLED"
    assert json.loads(stderr)["error"]["code"] == "task_cancelled"


def test_a_wait_that_times_out_exits_124_with_the_last_state(stack: Stack) -> None:
    url = stack.api.base_url
    # The longest task the service takes (MAX_TASK_DURATION): on a busy machine starting the
    # CLI alone can take seconds, and the task must still be running when the wait ends.
    task_id = frm("submit", unique("slow"), "--params", '{"duration": 35}', url=url).json["task_id"]
    waited = frm("wait", task_id, "--timeout", "0.5", url=url)
    assert frm("cancel", task_id, url=url).code == 0  # frees the worker's slot at once
    assert waited.code == 124
    assert waited.json["status"] in {"PENDING", "RUNNING"}
    assert waited.error["code"] == "wait_timeout"


def test_an_unknown_task_exits_4(stack: Stack) -> None:
    read = frm("get", "f" * 32, url=stack.api.base_url)
    assert read.code == 4
    assert read.stdout == ""
    assert read.error == {
        "code": "task_not_found",
        "message": "no task with this id",
        "status": 404,
    }


@pytest.mark.parametrize("api_key", [None, "not-a-key"])
def test_a_missing_or_wrong_api_key_exits_5(stack: Stack, api_key: str | None) -> None:
    refused = frm("get", "f" * 32, url=stack.api.base_url, api_key=api_key)
    assert refused.code == 5
    assert refused.error["code"] == "unauthorized"


def test_a_refused_body_exits_5_naming_the_field(stack: Stack) -> None:
    refused = frm("submit", "x", "--params", '{"fail": "yes"}', url=stack.api.base_url)
    assert refused.code == 5
    assert refused.error["code"] == "invalid_request"
    assert refused.error["message"].startswith("params.fail")


def test_no_service_exits_6_after_the_retries() -> None:
    gone = frm("--attempts", "2", "-v", "get", "f" * 32, url=f"http://127.0.0.1:{free_port()}")
    assert gone.code == 6
    assert gone.error["code"] == "unreachable"
    assert "retry 1 of 1" in gone.stderr  # -v logs each retry


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["submit", "x", "--params", "[1]"], "--params: must be a JSON object"),
        (["submit", "x", "--params", "{"], "--params: not valid JSON"),
        (["wait", "abc", "--timeout", "-1"], "--timeout: must be 0 or more seconds"),
        (["--attempts", "0", "get", "abc"], "--attempts: must be at least 1"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
        (["get", ""], "task_id: must not be empty"),
        (["--url", "http://[::1", "get", "abc"], "--url: base_url 'http://[::1' is not a valid"),
        (["--url", "ftp://example.org", "get", "abc"], "is not an http:// or https:// URL"),
    ],
)
def test_a_usage_error_exits_2_naming_the_argument(args: list[str], complaint: str) -> None:
    wrong = frm(*args, url=f"http://127.0.0.1:{free_port()}")
    assert wrong.code == 2
    assert wrong.error["code"] == "usage"  # JSON, as every other error
    assert complaint in wrong.error["message"]
    assert wrong.stdout == ""


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_without_a_traceback() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the command keeps retrying
    command = [script(), "--attempts", "50", "-v", "get", "f" * 32]
    with subprocess.Popen(
        command,
        env=env(url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A child inherits an ignored SIGINT, and Python then installs no KeyboardInterrupt
        # for it: a suite started in the background by a non-interactive shell ignores SIGINT
        # in every process. A terminal's Ctrl-C reaches a CLI whose SIGINT is the default.
        preexec_fn=_interruptible,
    ) as running:
        assert running.stderr is not None
        assert "retry 1 of 49" in running.stderr.readline()  # it is running, not importing
        running.send_signal(signal.SIGINT)
        stdout, stderr = running.communicate(timeout=20)
    assert running.returncode == 130
    assert stdout == ""
    assert "Traceback" not in stderr
    assert json.loads(stderr.splitlines()[-1])["error"]["code"] == "interrupted"


def test_the_shared_options_may_follow_the_command(stack: Stack) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    read = frm("get", "f" * 32, "--url", stack.api.base_url, "--attempts", "1", url=nowhere)
    assert read.code == 4, read.stderr  # the api answered: --url after the command won
    assert read.error["code"] == "task_not_found"


def test_version_prints_the_installed_version() -> None:
    shown = frm("--version", url=f"http://127.0.0.1:{free_port()}")
    assert shown.code == 0
    assert shown.stdout.strip() == f"frm-client {version('fastapi-redis-mini-client')}"


def test_a_server_that_is_not_the_api_is_not_no_such_task(stack: Stack) -> None:
    # The worker's metrics port answers 404 to /tasks/...: that is a wrong URL, not a task.
    read = frm("--attempts", "1", "get", "f" * 32, url=stack.worker.base_url)
    assert read.code == 6
    assert read.error["status"] == 404


def test_a_closed_stdout_exits_141_without_a_traceback(stack: Stack) -> None:
    reader, writer = os.pipe()
    os.close(reader)  # as `| head -c0` does, before anything is written
    try:
        done = subprocess.run(
            [script(), "submit", unique("nobody reads this")],
            env=env(stack.api.base_url),
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(writer)
    assert done.returncode == 141
    assert "Traceback" not in done.stderr


def test_ctrl_c_during_run_names_the_task_that_goes_on_running(stack: Stack) -> None:
    prompt = unique("interrupted run")
    command = [script(), "run", prompt, "--params", '{"duration": 20}']
    redis = stack.redis.client()
    with subprocess.Popen(
        command, env=env(stack.api.base_url), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as running:
        try:
            stored: list[str] = []

            def submitted() -> bool:
                stored.extend(
                    str(key).removeprefix("task:")
                    for key in redis.scan_iter(match="task:*", _type="hash")
                    if prompt in str(redis.hget(key, "request") or "")
                )
                return bool(stored)

            poll(submitted, 30, 0.1)
            time.sleep(2)  # its answer reaches the command, which is now in its wait
            running.send_signal(signal.SIGINT)
            _, stderr = running.communicate(timeout=20)
        finally:
            redis.close()
    assert running.returncode == 130
    error = json.loads(stderr.decode().splitlines()[-1])["error"]
    assert error["code"] == "interrupted"
    assert error["task_id"] == stored[0]
    with Client(stack.api.base_url, API_KEY) as client:
        assert client.cancel(stored[0]).task_id == stored[0]  # found, and freed at once
