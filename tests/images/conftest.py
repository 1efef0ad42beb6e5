"""Fixtures for the image tests: an engine, the two images built once, and a size report."""

from __future__ import annotations

import pytest

from ..support.docker import (
    BuiltImage,
    image_size_bytes,
    project_images,
    python_base_image,
    report,
    report_lines,
    require_engine,
)


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Fails every image test under CI=true when no engine answers."""
    require_engine()


@pytest.fixture(scope="session")
def images(docker_engine: None) -> dict[str, BuiltImage]:
    """The api and worker images built from services/Dockerfile on the Python base."""
    built = project_images()
    base = python_base_image()
    report(f"base {base}: {image_size_bytes(base) / 1e6:.1f} MB")
    for image in built.values():
        report(
            f"{image.tag}: {image.size_mb:.1f} MB ({image.size_bytes} bytes), "
            f"built in {image.build_seconds:.1f} s"
        )
    return built


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = report_lines()
    if lines:
        terminalreporter.section("container images")
        for line in lines:
            terminalreporter.write_line(line)
