"""The client installs and imports without any of the server's dependencies."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from fastapi_redis_mini.core import models
from fastapi_redis_mini_client import Task, TaskStatus

from ..support import REPO_ROOT
from .conftest import API_KEY, Stack

SERVER_ONLY = {
    "fastapi",
    "fastapi-redis-mini",
    "gunicorn",
    "hiredis",
    "orjson",
    "prometheus-client",
    "pydantic",
    "pydantic-settings",
    "redis",
    "starlette",
    "uvicorn",
}
SERVER_MODULES = {name.replace("-", "_") for name in SERVER_ONLY} | {"prometheus_client"}


@pytest.mark.slow
def test_installing_the_client_pulls_in_none_of_the_servers_dependencies() -> None:
    # What `pip install fastapi-redis-mini-client` resolves to, read from the lock file.
    exported = subprocess.run(
        [
            str(Path(sys.executable).parent / "uv"),
            "export",
            "--frozen",
            "--package=fastapi-redis-mini-client",
            "--no-dev",
            "--no-hashes",
            "--no-emit-project",
            "--format=requirements-txt",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    names = set(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", exported, re.MULTILINE))
    assert "httpx" in names
    assert not names & SERVER_ONLY
    assert not {name for name in names if name.startswith("opentelemetry")}


@pytest.mark.slow
def test_importing_the_client_loads_no_server_module() -> None:
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys, fastapi_redis_mini_client, fastapi_redis_mini_client.cli; "
            "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    top_level = set(json.loads(loaded))
    assert "httpx" in top_level
    assert not top_level & SERVER_MODULES
    assert "opentelemetry" not in top_level


def test_the_client_reads_every_field_the_service_answers_with() -> None:
    # The client keeps its own Task so that it needs no pydantic; this keeps the two in step.
    client_fields = set(Task.__dataclass_fields__)
    answered = models.Task.model_json_schema(mode="serialization")["properties"]
    # One Task for a read's answer and a submit's (whose `coalesced` a read does not carry).
    assert set(answered) | set(models.TaskSubmitted.model_fields) == client_fields
    assert {status.value for status in TaskStatus} == {s.value for s in models.TaskStatus}
    assert {s.value for s in TaskStatus if s.is_final} == {s.value for s in models.FINAL_STATUSES}


@pytest.mark.slow
def test_the_client_wheel_installs_alone_into_an_empty_environment(tmp_path: Path) -> None:
    uv = str(Path(sys.executable).parent / "uv")

    def run(*args: str | Path) -> str:
        done = subprocess.run(
            [str(arg) for arg in args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    run(
        uv,
        "build",
        "--package=fastapi-redis-mini-client",
        "--wheel",
        "--out-dir",
        tmp_path / "dist",
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    python = tmp_path / "venv" / "bin" / "python"
    run(uv, "venv", "--quiet", "--python", sys.executable, tmp_path / "venv")
    run(uv, "pip", "install", "--quiet", "--python", python, wheel)

    installed = run(uv, "pip", "freeze", "--python", python)
    names = {re.split(r"[=@ ]", line)[0].lower() for line in installed.splitlines() if line}
    assert {"fastapi-redis-mini-client", "httpx"} <= names
    assert not names & SERVER_ONLY
    assert not {name for name in names if name.startswith("opentelemetry")}
    help_text = run(tmp_path / "venv" / "bin" / "frm-client", "--help")
    assert "exit codes:" in help_text


@pytest.mark.slow
def test_a_client_generated_from_the_document_installs_beside_the_official_one(
    stack: Stack, tmp_path: Path
) -> None:
    uv, bin_dir = str(Path(sys.executable).parent / "uv"), Path(sys.executable).parent

    def run(*args: str | Path, **env: str) -> str:
        done = subprocess.run(
            [str(arg) for arg in args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    document = tmp_path / "openapi.json"
    document.write_bytes(httpx.get(stack.api.base_url + "/openapi.json", timeout=10).content)
    # Both ways a user may generate: with the shipped config, and with none at all.
    configs: list[list[str | Path]] = [
        ["--config", REPO_ROOT / "client" / "openapi-python-client.yaml"],
        [],
    ]
    for config in configs:
        output = tmp_path / f"generated{len(config)}"
        run(
            bin_dir / "openapi-python-client",
            "generate",
            "--path",
            document,
            "--meta",
            "uv",
            "--output-path",
            output,
            *config,
        )
        python = tmp_path / f"venv{len(config)}" / "bin" / "python"
        run(uv, "venv", "--quiet", "--python", sys.executable, python.parent.parent)
        run(uv, "pip", "install", "--quiet", "--python", python, REPO_ROOT / "client", output)

        installed = run(uv, "pip", "freeze", "--python", python).lower()
        assert "fastapi-redis-mini-client @" in installed
        assert "fastapi-redis-mini-api-client @" in installed
        assert (python.parent / "frm-client").exists()
        # Each, in the one environment, against the real api: the generated one submits,
        # the official one waits for that task.
        script = """
import sys
from fastapi_redis_mini_api_client import AuthenticatedClient
from fastapi_redis_mini_api_client.api.tasks import submit_task
from fastapi_redis_mini_api_client.models import TaskCreate, TaskCreateParams
from fastapi_redis_mini_client import Client
url, key, prompt = sys.argv[1:]
with AuthenticatedClient(base_url=url, token=key) as generated:
    body = TaskCreate(prompt=prompt, params=TaskCreateParams.from_dict({}))
    submitted = submit_task.sync(client=generated, body=body)
with Client(url, key) as official:
    print(official.wait(submitted.task_id, timeout=60).status)
"""
        prompt = f"generated beside official {uuid.uuid4().hex}"
        printed = run(python, "-c", script, stack.api.base_url, API_KEY, prompt)
        assert printed.strip() == "DONE"
