"""`make smoke` (tools/k8s/smoke.sh), dry-run against stand-ins for kubectl, helm and curl.

No cluster exists here. The stand-ins record every call and answer the way a cluster with
the release would, from a scenario: a healthy release, a ScaledObject KEDA cannot make
Ready, a task that failed. The script must print every command it runs, report each check,
exit non-zero when one fails, and remove what it created.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ..support.tools import require_tool
from .helm import REPO

SCRIPT = REPO / "tools" / "k8s" / "smoke.sh"
RELEASE = "frm-smoke"
TASKS = 5

# One program plays kubectl, helm and curl; it logs its argv and answers from the scenario.
STAND_IN = r"""
import json, os, sys, time
from pathlib import Path

state = Path(os.environ["STAND_IN_STATE"])
scenario = json.loads((state / "scenario.json").read_text())
tool, args = Path(sys.argv[0]).name, sys.argv[1:]
with (state / "calls.jsonl").open("a") as log:
    log.write(json.dumps([tool, *args]) + "\n")


def count(name):
    # Written whole by a rename: the helm upgrade stand-in reads it meanwhile.
    path = state / name
    n = int(path.read_text()) + 1 if path.exists() else 1
    partial = state / f"{name}.{os.getpid()}"
    partial.write_text(str(n))
    partial.replace(path)
    return n


def jsonpath():
    for arg in args:
        if arg.startswith("jsonpath="):
            return arg
    return ""


if tool == "kubectl":
    if args[:2] == ["config", "current-context"]:
        print("kind-fastapi-redis-mini")
    elif args[:2] == ["get", "namespace"]:
        sys.exit(0 if scenario["namespace_exists"] else 1)
    elif "port-forward" in args:
        # Runs until it is killed, as kubectl does; the pid shows whether anyone did.
        with (state / "port-forward-pids").open("a") as pids:
            pids.write(f"{os.getpid()}\n")
        # Hold none of the script's pipes, so its end is seen at once, with or without us.
        os.closerange(0, 256)
        time.sleep(60)
    elif "get" in args:
        kind = args[args.index("get") + 1]
        path = jsonpath()
        answers = scenario["objects"].get(kind, {})
        if kind == "deployment":
            replicas = scenario["worker_replicas"]
            print(replicas[min(count("replicas"), len(replicas)) - 1], end="")
        else:
            for key, value in answers.items():
                if key in path:
                    print(value, end="")
                    break
    elif "logs" in args:
        print("Locust summary: 0 failures")
    sys.exit(0)

if tool == "helm":
    command = args[0]
    if command == "status":
        sys.exit(0 if scenario["release_exists"] else 1)
    if command == "history":
        print("- app_version: 0.1.0\n  revision: 3\n  status: deployed")
    if command == "upgrade":
        # The load lasts until the worker has gone through its replica counts.
        deadline = time.monotonic() + 10
        replicas = state / "replicas"
        while time.monotonic() < deadline:
            if replicas.exists() and int(replicas.read_text()) >= len(scenario["worker_replicas"]):
                break
            time.sleep(0.05)
        sys.exit(0 if scenario["locust_succeeds"] else 1)
    sys.exit(0)

if tool == "curl":
    url = args[-1]
    method = args[args.index("-X") + 1] if "-X" in args else "GET"
    if url.endswith("/healthz"):
        print("ok")
    elif method == "POST":
        print(json.dumps({"task_id": f"t{count('tasks')}", "status": "PENDING"}))
    elif "/tasks/" in url:
        task_id = url.split("/tasks/")[1].split("?")[0]
        print(json.dumps({"task_id": task_id, "status": scenario["statuses"].get(task_id, "DONE")}))
    elif url.endswith("/metrics"):
        labels = '{group="workers",stream="task_stream"}'
        for name, value in scenario["queue"].items():
            print(f"fastapi_redis_mini_{name}{labels} {value}")
    sys.exit(0)
sys.exit(0)
"""

HEALTHY: dict[str, Any] = {
    "release_exists": False,
    "namespace_exists": False,
    "locust_succeeds": True,
    "worker_replicas": ["1", "1", "3"],
    "statuses": {},
    "queue": {"stream_lag": "0.0", "stream_pending": "0.0", "dead_letter_length": "0.0"},
    "objects": {
        "svc": {".metadata.name": f"{RELEASE}-fastapi-redis-mini-api", ".spec.ports": "8000"},
        "scaledobject": {
            ".metadata.name": f"{RELEASE}-fastapi-redis-mini-worker",
            ".status": "True",
            ".spec.minReplicaCount": "1",
        },
        "job": {
            ".metadata.name": f"{RELEASE}-fastapi-redis-mini-locust",
            ".status.succeeded": "1",
        },
    },
}


def scenario(**changes: Any) -> dict[str, Any]:
    merged: dict[str, Any] = json.loads(json.dumps(HEALTHY))
    for key, value in changes.items():
        merged[key] = value
    return merged


IMAGES = "--set api.image.tag=abc --set worker.image.tag=def"


def run_smoke(
    tmp_path: Path, world: dict[str, Any], install_args: str = IMAGES
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    (state / "scenario.json").write_text(json.dumps(world))
    program = bin_dir / "stand-in.py"
    program.write_text(f"#!{sys.executable}\n{STAND_IN}")
    program.chmod(0o755)
    for tool in ("kubectl", "helm", "curl", "kind"):
        (bin_dir / tool).symlink_to(program)
    system = os.pathsep.join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if Path(p).is_dir())
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{system}",
        "HOME": str(tmp_path),
        "STAND_IN_STATE": str(state),
        "SMOKE_TASKS": str(TASKS),
        "SMOKE_WAIT_SECONDS": "20",
        "SMOKE_POLL_SECONDS": "0.1",
        "SMOKE_INSTALL_ARGS": install_args,
    }
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    calls_file = state / "calls.jsonl"
    calls = (
        [json.loads(line) for line in calls_file.read_text().splitlines()]
        if calls_file.exists()
        else []
    )
    return result, calls


def report(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Check name -> "PASS detail" or "FAIL detail", from the report the script prints."""
    lines = result.stdout.split("== smoke:")[1].splitlines()[1:]
    checks = {}
    for line in lines:
        if line.startswith(("PASS", "FAIL")):
            status, rest = line[:4], line[4:].strip()
            name = rest[:14].strip()
            checks[name] = f"{status} {rest[14:].strip()}"
    return checks


def traced(result: subprocess.CompletedProcess[str]) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in result.stderr.splitlines() if line.startswith("+ ")]


def test_the_smoke_script_is_shellcheck_clean() -> None:
    shellcheck = require_tool("shellcheck", "shellcheck")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_a_healthy_release_passes_every_check_and_the_install_is_removed(tmp_path: Path) -> None:
    result, calls = run_smoke(tmp_path, HEALTHY)
    checks = report(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(checks) == [
        "release",
        "helm test",
        "submit",
        "autoscaler",
        "locust",
        "tasks done",
        "queue",
    ]
    assert all(line.startswith("PASS") for line in checks.values()), checks
    assert checks["submit"] == f"PASS {TASKS} of {TASKS} tasks accepted"
    assert "scaled out to 3 (min 1)" in checks["autoscaler"]
    assert "== all checks passed" in result.stdout
    posts = [c for c in calls if c[0] == "curl" and "POST" in c]
    assert len(posts) == TASKS
    reads = [c for c in calls if c[0] == "curl" and any("/tasks/t" in a for a in c)]
    assert len(reads) == TASKS
    upgrade = next(c for c in calls if c[:2] == ["helm", "upgrade"])
    assert {"--reuse-values", "loadtest.job.enabled=true"} <= set(upgrade)
    assert ["helm", "uninstall", RELEASE, "-n", RELEASE, "--wait"] in calls
    assert any(c[:3] == ["kubectl", "delete", "namespace"] for c in calls)
    install = next(c for c in calls if c[:2] == ["helm", "install"])
    assert {"api.image.tag=abc", "worker.image.tag=def"} <= set(install)


def test_a_namespace_that_existed_before_the_install_is_kept(tmp_path: Path) -> None:
    result, calls = run_smoke(tmp_path, scenario(namespace_exists=True))
    assert result.returncode == 0, result.stdout + result.stderr
    assert ["helm", "uninstall", RELEASE, "-n", RELEASE, "--wait"] in calls
    assert not any(c[:3] == ["kubectl", "delete", "namespace"] for c in calls)
    # Only what the install left behind goes: the Redis Secret helm uninstall keeps.
    (delete,) = [c for c in calls if c[0] == "kubectl" and "delete" in c]
    assert delete[delete.index("delete") + 1] == "secret"
    assert f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=redis" in delete


def test_no_port_forward_outlives_the_script(tmp_path: Path) -> None:
    result, _ = run_smoke(tmp_path, HEALTHY)
    assert result.returncode == 0, result.stdout + result.stderr
    pids = [int(p) for p in (tmp_path / "state" / "port-forward-pids").read_text().split()]
    assert len(pids) == 2  # one for the submits, one for the checks after the load
    deadline = time.monotonic() + 5
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
        time.sleep(0.1)
    assert alive == [], "kubectl port-forward still running after the script ended"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return False


def test_without_images_it_does_not_install_and_says_how_to_get_them(tmp_path: Path) -> None:
    result, calls = run_smoke(tmp_path, HEALTHY, install_args="")
    assert result.returncode == 1
    assert report(result)["release"].startswith(
        f"FAIL no release {RELEASE} in {RELEASE}: run make deploy"
    )
    assert not any(c[:2] == ["helm", "install"] for c in calls)


def test_make_targets_name_the_kind_cluster_and_pass_extra_deploy_arguments() -> None:
    make = require_tool("make", "make")

    def dry_run(*args: str) -> str:
        return subprocess.run(
            [make, "--no-print-directory", "-n", "-C", str(REPO), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout

    assert "kind create cluster --name 'other'" in dry_run("cluster-up", "K8S_CLUSTER=other")
    deploy = dry_run("deploy", "DEPLOY_ARGS=--set redis.mode=cluster")
    assert "--set redis.mode=cluster" in deploy
    smoke = dry_run("smoke")
    assert "SMOKE_RELEASE='frm' SMOKE_NAMESPACE='fastapi-redis-mini'" in smoke


def test_an_old_bash_is_refused_with_a_message(tmp_path: Path) -> None:
    # BASH_VERSINFO is read-only; a shell function stands in for the version check's view.
    script = SCRIPT.read_text().replace("BASH_VERSINFO[0]", "3").replace("BASH_VERSINFO[1]", "2")
    old = tmp_path / "smoke.sh"
    old.write_text(script)
    result = subprocess.run(["bash", str(old)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "needs bash 4.4 or later" in result.stderr


def test_every_command_it_runs_is_printed_first(tmp_path: Path) -> None:
    result, calls = run_smoke(tmp_path, HEALTHY)
    printed = Counter(json.dumps(argv) for argv in traced(result))
    ran = Counter(json.dumps(call) for call in calls)
    assert ran, "the stand-ins were never called"
    assert ran - printed == Counter(), "commands that ran without being printed"


def test_a_scaled_object_keda_cannot_read_shows_its_reason_and_fails(tmp_path: Path) -> None:
    broken = scenario(worker_replicas=["1"])
    # What KEDA's operator reports when the trigger's address does not resolve in its namespace.
    reason = "error dialing redis: lookup frm-smoke-fastapi-redis-mini-redis: no such host"
    broken["objects"]["scaledobject"] = {
        ".metadata.name": f"{RELEASE}-fastapi-redis-mini-worker",
        '.status.conditions[?(@.type=="Ready")].status': "False",
        '.status.conditions[?(@.type=="Ready")].message': reason,
        ".spec.minReplicaCount": "1",
    }
    result, _ = run_smoke(tmp_path, broken)
    checks = report(result)
    assert result.returncode == 1
    assert checks["autoscaler"] == f"FAIL ScaledObject not Ready: {reason}"
    assert checks["tasks done"].startswith("PASS")
    assert "== FAILED" in result.stdout


def test_a_task_not_done_and_dead_letters_are_named_in_the_report(tmp_path: Path) -> None:
    world = scenario(
        statuses={"t3": "FAILED"},
        queue={"stream_lag": "0.0", "stream_pending": "0.0", "dead_letter_length": "2.0"},
    )
    result, _ = run_smoke(tmp_path, world)
    checks = report(result)
    assert result.returncode == 1
    assert checks["tasks done"] == f"FAIL {TASKS - 1} of {TASKS} DONE; not DONE: t3=FAILED"
    assert checks["queue"] == "FAIL lag 0.0, pending 0.0, dead letters 2.0"


def test_an_existing_release_is_used_and_rolled_back_after_the_load(tmp_path: Path) -> None:
    result, calls = run_smoke(tmp_path, scenario(release_exists=True))
    assert result.returncode == 0, result.stdout + result.stderr
    assert report(result)["release"] == "PASS using the existing release"
    assert not any(c[:2] == ["helm", "install"] for c in calls)
    assert not any(c[:2] == ["helm", "uninstall"] for c in calls)
    assert ["helm", "rollback", RELEASE, "3", "-n", RELEASE, "--wait"] in calls


def test_a_failed_locust_run_fails_the_smoke(tmp_path: Path) -> None:
    result, _ = run_smoke(tmp_path, scenario(locust_succeeds=False))
    assert result.returncode == 1
    assert report(result)["locust"].startswith("FAIL the Locust job did not succeed")


@pytest.mark.parametrize("tool", ["helm", "kubectl", "curl"])
def test_make_smoke_names_the_tool_it_is_missing(tool: str, tmp_path: Path) -> None:
    make = require_tool("make", "make")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for present in {"helm", "kubectl", "curl"} - {tool}:
        (bin_dir / present).symlink_to("/bin/true")
    result = subprocess.run(
        [make, "--no-print-directory", "-C", str(REPO), "smoke"],
        env={**os.environ, "PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"make smoke: missing {tool}" in result.stderr


def test_docs_end_by_explaining_every_check_the_report_can_show() -> None:
    import re

    script = SCRIPT.read_text()
    checks = set(re.findall(r'result (?:PASS|FAIL) "?([a-z][a-z -]*[a-z])"? ', script))
    assert {"release", "helm test", "autoscaler", "queue"} <= checks
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    headings = re.findall(r"^## (.+)$", docs, re.MULTILINE)
    assert headings[-1] == "The smoke test"
    smoke_section = docs.rpartition("## The smoke test")[2]
    explained = set(re.findall(r"^\| `([^`]+)` \|", smoke_section, re.MULTILINE))
    assert checks == explained


def test_a_worker_that_never_scales_out_fails_the_autoscaler_check(tmp_path: Path) -> None:
    result, _ = run_smoke(tmp_path, scenario(worker_replicas=["1"]))
    assert result.returncode == 1
    assert report(result)["autoscaler"] == (
        "FAIL ScaledObject Ready, but the worker stayed at 1 replicas (min 1)"
    )
