"""Log lines carry a timestamp with its UTC offset, in both formats."""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import UTC, datetime

import pytest

from fastapi_redis_mini.core.telemetry.logging import configure_logging


@pytest.fixture(autouse=True)
def restore_root_logger() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_an_iso_timestamp_with_its_offset(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "INFO", "worker")
    logging.getLogger("fastapi_redis_mini.test").info("hello")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    stamp = datetime.fromisoformat(line["time"])
    assert stamp.utcoffset() is not None, line["time"]
    assert abs((datetime.now().astimezone() - stamp).total_seconds()) < 60


def test_text_lines_carry_the_offset_after_the_time(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("text", "INFO", "api")
    logging.getLogger("fastapi_redis_mini.test").info("hello")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"^\d\d:\d\d:\d\d[+-]\d{4} api +INFO +hello$", line), line


def test_json_time_follows_a_dst_change_within_the_same_formatter(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Europe/Berlin moves from +01:00 to +02:00 at 2026-03-29 01:00:00 UTC.
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        configure_logging("json", "INFO", "worker")
        logger = logging.getLogger("fastapi_redis_mini.test")
        change = datetime(2026, 3, 29, 1, tzinfo=UTC).timestamp()
        moments = [change - 0.5, change - 0.25, change + 0.25, change + 1.75]
        for created in moments:
            record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "x", (), None)
            record.created = created
            logger.handle(record)
        lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert [line["time"] for line in lines[-4:]] == [
        "2026-03-29T01:59:59.500+01:00",
        "2026-03-29T01:59:59.750+01:00",
        "2026-03-29T03:00:00.250+02:00",
        "2026-03-29T03:00:01.750+02:00",
    ]
