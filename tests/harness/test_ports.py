"""The harness's port picks: never a port the service or its tools take by default."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import pytest

from fastapi_redis_mini_harness import ports


def test_a_pick_that_lands_on_a_default_port_is_passed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The random draws land on every default port first, then on one that is no default.
    draws: Iterator[int] = iter([*sorted(ports.DEFAULT_PORTS), 4321])

    def choice(share: Sequence[int]) -> int:
        return next(draws)

    monkeypatch.setattr(random, "choice", choice)
    monkeypatch.setattr(ports, "own_share", lambda _: range(2000, 12000))
    monkeypatch.setattr(ports, "_given", set())

    assert ports.free_port() == 4321


def test_the_service_defaults_are_among_the_ports_never_picked() -> None:
    from fastapi_redis_mini.core.settings import Settings

    fields = Settings.model_fields
    defaults = {fields[name].default for name in ("port", "metrics_port", "api_metrics_port")}
    assert defaults <= ports.DEFAULT_PORTS
