"""Build and run the project's container images from tests.

Every build and container uses the host network: the engine on these machines runs without
a bridge, and all traffic stays on loopback. `--add-host NAME:127.0.0.1` stands in for the
DNS names that compose or a cluster would provide.

No registry is reachable, so the Python base image is a local stand-in: Debian bookworm from
debootstrap with python3, imported with `docker import` and cached by a tag derived from its
recipe. The project's Dockerfile is built unchanged; only its PYTHON_IMAGE build argument
points at the stand-in. Set TEST_PYTHON_IMAGE to build on a real image instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from fastapi_redis_mini_harness.http import tls_context
from fastapi_redis_mini_harness.polling import poll

from . import REPO_ROOT

DOCKERFILE = REPO_ROOT / "services" / "Dockerfile"
IMAGE_TARGETS = ("api", "worker")
IMAGE_USER = "10001:10001"

DOCKER_TIMEOUT = 120.0
BUILD_TIMEOUT = 1200.0
DEBOOTSTRAP_TIMEOUT = 900.0
LOCK_TIMEOUT = 1800.0

STANDIN_SUITE = "bookworm"
STANDIN_MIRROR = "http://deb.debian.org/debian"
STANDIN_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_STANDIN_CA_PATH = "/etc/ssl/certs/ca-certificates.crt"
# What the official image sets and a `docker import` lacks (PATH, a UTF-8 locale), plus the
# CA settings pip needs to reach the package index through this network's TLS proxy. They
# live in the stand-in only: the project's Dockerfile stays what a user builds.
_STANDIN_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    f"ENV SSL_CERT_FILE={_STANDIN_CA_PATH}",
    f"ENV PIP_CERT={_STANDIN_CA_PATH}",
    'CMD ["python3"]',
)
# Removed after debootstrap so the stand-in is about as small as a slim image.
_STANDIN_TRIM = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
)
# Bump when the recipe changes in a way the fields hashed below do not capture.
_STANDIN_RECIPE_VERSION = 1

_REDIS_STANDIN_DOCKERFILE = """\
FROM {base}
RUN apt-get update -q \\
 && apt-get install -y -q --no-install-recommends redis-server \\
 && apt-get clean \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \\
 && mkdir -p /data
WORKDIR /data
CMD ["redis-server"]
"""

T = TypeVar("T")


class DockerTestError(RuntimeError):
    """A docker, debootstrap or compose command failed; the message carries its output."""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run_command(
    args: Sequence[str],
    *,
    timeout: float = DOCKER_TIMEOUT,
    check: bool = True,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, bounded by `timeout`; raise DockerTestError on failure."""
    try:
        proc = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            env=None if env is None else {**os.environ, **env},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DockerTestError(f"{' '.join(args[:4])}... timed out after {timeout:.0f}s") from exc
    if check and proc.returncode != 0:
        raise DockerTestError(
            f"{' '.join(args)} exited {proc.returncode}:\n{_tail(proc.stdout + proc.stderr)}"
        )
    return proc


def docker(*args: str, timeout: float = DOCKER_TIMEOUT, check: bool = True) -> str:
    """Run one docker CLI command and return its stdout."""
    return run_command(["docker", *args], timeout=timeout, check=check).stdout


# --- the engine ---------------------------------------------------------------------------


@functools.cache
def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None when one answers (asked once a run)."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        proc = run_command(
            ["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30, check=False
        )
    except DockerTestError as exc:
        return str(exc)
    if proc.returncode != 0 or not proc.stdout.strip():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"`docker info` failed: {last}"
    return None


def _no_engine_message(problem: str) -> str:
    return f"no Docker engine ({problem}); start one with `bash tools/ci/docker-engine.sh`"


def require_engine() -> None:
    """Skip the calling test when no engine answers; under CI=true, fail instead."""
    problem = engine_problem()
    if problem is None:
        return
    if in_ci():
        pytest.fail(f"CI=true requires an engine: {_no_engine_message(problem)}", pytrace=False)
    pytest.skip(_no_engine_message(problem))


def skip_module_without_engine() -> None:
    """Call at the top of a test module: skips it when no engine answers.

    Every module skipped this way shares this line as its skip location, so pytest's summary
    folds them into one line. Under CI=true it does nothing: the tests then run, and their
    fixtures fail (a collection error would stop the whole run).
    """
    problem = engine_problem()
    if problem is not None and not in_ci():
        pytest.skip(_no_engine_message(problem), allow_module_level=True)


def image_exists(ref: str) -> bool:
    proc = run_command(["docker", "image", "inspect", ref], check=False)
    return proc.returncode == 0


def image_inspect(ref: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(docker("image", "inspect", ref))
    return data[0]


def image_size_bytes(ref: str) -> int:
    return int(image_inspect(ref)["Size"])


@contextlib.contextmanager
def _exclusive(name: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold a host-wide lock, so concurrent test runs build a shared image only once."""
    path = Path(tempfile.gettempdir()) / f"fastapi-redis-mini-{name}.lock"
    with path.open("w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DockerTestError(f"{path} still locked after {timeout:.0f}s") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_report: list[str] = []


def report(line: str) -> None:
    """Keep a line (an image size, a timing) for the end-of-run "container images" summary."""
    _report.append(line)


def report_lines() -> list[str]:
    return list(_report)


# --- the stand-in base image --------------------------------------------------------------


def standin_base_tag() -> str:
    """The stand-in's tag: a digest of everything that goes into it."""
    recipe = {
        "version": _STANDIN_RECIPE_VERSION,
        "suite": STANDIN_SUITE,
        "mirror": STANDIN_MIRROR,
        "packages": STANDIN_PACKAGES,
        "changes": _STANDIN_CHANGES,
        "trim": _STANDIN_TRIM,
        "ca": hashlib.sha256(HOST_CA_BUNDLE.read_bytes()).hexdigest()
        if HOST_CA_BUNDLE.exists()
        else None,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"fastapi-redis-mini-test/python-standin:{STANDIN_SUITE}-{digest}"


def python_base_image() -> str:
    """The PYTHON_IMAGE for test builds: TEST_PYTHON_IMAGE, else the stand-in (built once)."""
    override = os.environ.get("TEST_PYTHON_IMAGE")
    if override:
        return override
    tag = standin_base_tag()
    if image_exists(tag):
        return tag
    with _exclusive("standin"):
        if not image_exists(tag):
            started = time.monotonic()
            _build_standin(tag)
            report(f"built the stand-in base {tag} in {time.monotonic() - started:.1f} s")
    return tag


def _unmount_below(root: Path) -> None:
    """Undo mounts debootstrap may leave behind when it fails, before deleting the tree."""
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        run_command(["umount", "-l", point], check=False)


def _build_standin(tag: str) -> None:
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise DockerTestError(
            "debootstrap is not installed (`bash tools/ci/docker-engine.sh` installs it)"
        )
    if os.geteuid() != 0:
        raise DockerTestError(f"building the stand-in base {tag} with debootstrap needs root")
    if not HOST_CA_BUNDLE.exists():
        raise DockerTestError(f"{HOST_CA_BUNDLE} is missing; pip in the build needs it")
    with tempfile.TemporaryDirectory(
        prefix="fastapi-redis-mini-standin-", ignore_cleanup_errors=True
    ) as workdir:
        root = Path(workdir) / "rootfs"
        try:
            run_command(
                [
                    debootstrap,
                    "--variant=minbase",
                    f"--include={','.join(STANDIN_PACKAGES)}",
                    STANDIN_SUITE,
                    str(root),
                    STANDIN_MIRROR,
                ],
                timeout=DEBOOTSTRAP_TIMEOUT,
            )
            for relative in _STANDIN_TRIM:
                for entry in (root / relative).glob("*"):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            shutil.copyfile(HOST_CA_BUNDLE, root / _STANDIN_CA_PATH.lstrip("/"))
            _import_rootfs(root, tag)
        finally:
            _unmount_below(root)


def _import_rootfs(root: Path, tag: str) -> None:
    changes = [arg for change in _STANDIN_CHANGES for arg in ("--change", change)]
    tar_args = ["tar", "--numeric-owner", "-C", str(root)]
    tar_args += ["--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*", "-c", "."]
    with subprocess.Popen(tar_args, stdout=subprocess.PIPE) as tar:
        try:
            imported = subprocess.run(
                ["docker", "import", *changes, "-", tag],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=DOCKER_TIMEOUT * 3,
                check=False,
            )
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
        tar_status = tar.wait(timeout=DOCKER_TIMEOUT)
    if tar_status != 0 or imported.returncode != 0:
        raise DockerTestError(
            f"importing {root} as {tag} failed (tar {tar_status}, docker import "
            f"{imported.returncode}): {_tail(imported.stderr)}"
        )


def redis_standin_image() -> str:
    """A Redis image made from the stand-in base with Debian's redis-server, built once.

    Stands in for the official redis image in compose runs, as the Python stand-in does for
    the Python image: no registry is reachable here.
    """
    base = python_base_image()
    digest = hashlib.sha256((base + _REDIS_STANDIN_DOCKERFILE).encode()).hexdigest()[:12]
    tag = f"fastapi-redis-mini-test/redis-standin:{digest}"
    if image_exists(tag):
        return tag
    with _exclusive("redis-standin"):
        if not image_exists(tag):
            started = time.monotonic()
            run_command(
                ["docker", "build", "--network", "host", "--tag", tag, "-"],
                input_text=_REDIS_STANDIN_DOCKERFILE.format(base=base),
                timeout=BUILD_TIMEOUT,
            )
            report(f"built the Redis stand-in {tag} in {time.monotonic() - started:.1f} s")
    return tag


# --- the project's images -----------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    target: str
    tag: str
    revision: str
    size_bytes: int
    build_seconds: float

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1_000_000


def git_revision() -> str:
    proc = run_command(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], check=False)
    return proc.stdout.strip() or "unknown"


def build_image(target: str, *, base_image: str, tag: str, extras: str = "") -> BuiltImage:
    """Build one target of services/Dockerfile exactly as `make images` does."""
    started = time.monotonic()
    revision = git_revision()
    extra_args = ["--build-arg", f"EXTRAS={extras}"] if extras else []
    run_command(
        [
            "docker",
            "build",
            "--network",
            "host",
            "--file",
            str(DOCKERFILE),
            "--target",
            target,
            "--build-arg",
            f"PYTHON_IMAGE={base_image}",
            "--build-arg",
            f"REVISION={revision}",
            *extra_args,
            "--tag",
            tag,
            str(REPO_ROOT),
        ],
        timeout=BUILD_TIMEOUT,
    )
    return BuiltImage(target, tag, revision, image_size_bytes(tag), time.monotonic() - started)


_built_images: dict[str, BuiltImage] = {}


def project_images() -> dict[str, BuiltImage]:
    """The api and worker images, built once per run.

    Tagged `fastapi-redis-mini-TARGET:test-<commit>`: a run elsewhere on the same engine at
    another commit builds other tags instead of moving these under this run's feet.
    """
    base = python_base_image()
    tag = f"test-{git_revision()[:12]}"
    for target in IMAGE_TARGETS:
        if target not in _built_images:
            image = f"fastapi-redis-mini-{target}:{tag}"
            _built_images[target] = build_image(target, base_image=base, tag=image)
    return dict(_built_images)


def embed_worker_image() -> BuiltImage:
    """The worker image with the `embed` extra (the model and numpy), built once per run."""
    key = "worker+embed"
    if key not in _built_images:
        tag = f"fastapi-redis-mini-worker:test-{git_revision()[:12]}-embed"
        _built_images[key] = build_image(
            "worker", base_image=python_base_image(), tag=tag, extras="embed"
        )
    return _built_images[key]


# --- containers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StopResult:
    exit_code: int
    seconds: float
    oom_killed: bool


@dataclass(frozen=True)
class Container:
    name: str
    image: str

    def inspect(self) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(docker("container", "inspect", self.name))
        return data[0]

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.inspect()["State"]
        return state

    def is_running(self) -> bool:
        return bool(self.state()["Running"])

    def logs(self) -> str:
        proc = run_command(["docker", "logs", self.name], check=False)
        return proc.stdout + proc.stderr

    def stop(self, grace_seconds: int) -> StopResult:
        """`docker stop`: SIGTERM, then SIGKILL after `grace_seconds`."""
        started = time.monotonic()
        docker("stop", "--time", str(grace_seconds), self.name, timeout=grace_seconds + 60)
        seconds = time.monotonic() - started
        state = self.state()
        return StopResult(int(state["ExitCode"]), seconds, bool(state["OOMKilled"]))

    def remove(self) -> None:
        run_command(["docker", "rm", "--force", "--volumes", self.name], check=False)


def start_container(
    image: str,
    *,
    env: Mapping[str, str] | None = None,
    loopback_hosts: Sequence[str] = (),
    user: str = IMAGE_USER,
    read_only: bool = True,
    tmpfs: Sequence[str] = ("/tmp",),
    name_prefix: str = "fastapi-redis-mini-test",
    command: Sequence[str] = (),
    extra_args: Sequence[str] = (),
) -> Container:
    """`docker run -d` on the host network, hardened as the chart runs it.

    `loopback_hosts` resolve to 127.0.0.1 inside the container: stand-ins for Service DNS names.
    """
    name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
    args = ["run", "--detach", "--name", name, "--network", "host", "--user", user]
    if read_only:
        args.append("--read-only")
    for path in tmpfs:
        args += ["--tmpfs", path]
    for host in loopback_hosts:
        args += ["--add-host", f"{host}:127.0.0.1"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    args += [*extra_args, image, *command]
    docker(*args)
    return Container(name, image)


def run_once(
    image: str,
    command: Sequence[str],
    *,
    entrypoint: str | None = None,
    user: str = IMAGE_USER,
    timeout: float = DOCKER_TIMEOUT,
    network: str = "host",
) -> subprocess.CompletedProcess[str]:
    """`docker run --rm` to completion, hardened like start_container(); does not check."""
    args = ["docker", "run", "--rm", "--network", network, "--user", user, "--read-only"]
    args += ["--tmpfs", "/tmp"]
    if entrypoint is not None:
        args += ["--entrypoint", entrypoint]
    return run_command([*args, image, *command], timeout=timeout, check=False)


@contextlib.contextmanager
def removing(container: Container) -> Iterator[Container]:
    """Remove `container` when the with-block ends, printing the tail of its logs first.

    pytest shows captured output only for a test that failed, so the logs appear exactly
    when they help, including when the block sits in a fixture that never sees the failure.
    """
    try:
        yield container
    finally:
        print(f"--- logs of {container.name} ({container.image}) ---")
        print(_tail(container.logs(), 80))
        container.remove()


# --- waiting ------------------------------------------------------------------------------


def wait_for(
    probe: Callable[[], T | None], *, timeout: float, interval: float = 0.25, what: str
) -> T:
    """Call `probe` until it returns something other than None, at most `timeout` seconds."""
    return poll(probe, timeout, interval, what)


def wait_for_http(
    url: str, *, timeout: float = 60.0, container: Container | None = None
) -> httpx.Response:
    """Poll `url` until it answers 200; give up early if `container` has exited."""

    def probe() -> httpx.Response | None:
        try:
            response = httpx.get(url, timeout=2.0, verify=tls_context())
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 200:
            return response
        if container is not None and not container.is_running():
            state = container.state()
            raise DockerTestError(
                f"{container.name} exited {state['ExitCode']} before {url} answered:\n"
                f"{_tail(container.logs())}"
            )
        return None

    return wait_for(probe, timeout=timeout, what=f"GET {url}")


# --- compose ------------------------------------------------------------------------------


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) if present, else Debian's `docker-compose`, else None."""
    if shutil.which("docker") is not None:
        proc = run_command(["docker", "compose", "version"], check=False, timeout=30)
        if proc.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose") is not None:
        return ["docker-compose"]
    return None
