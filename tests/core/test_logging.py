"""Log lines carry a timestamp with its UTC offset, in both formats."""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import UTC, datetime

import pytest

from fastapi_redis_mini.core.telemetry.logging import BATCHED, configure_logging


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


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_batched_record_is_written_as_the_records_it_stands_for(
    log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each entry of a batch is the line a record of its own, with those fields, would give."""
    configure_logging(log_format, "INFO", "worker")
    logger = logging.getLogger("fastapi_redis_mini.test")
    now = time.time()
    entries: list[tuple[float, str, dict[str, object]]] = [
        (now - 2.5, "first: DONE", {"task_id": "t1", "status": "DONE", "attempt": 1}),
        (now - 1.0, "second: FAILED, boom", {"task_id": "t2", "reason": "boom", "span_id": "ab"}),
    ]
    for created, message, fields in entries:
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, (), None)
        record.__dict__.update(fields)
        record.created = created
        logger.handle(record)
    logger.info("%d lines", 2, extra={BATCHED: entries})
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4, lines
    singles, batched = lines[:2], lines[2:]
    if log_format == "json":
        assert [json.loads(line) for line in batched] == [json.loads(line) for line in singles]
    else:
        assert batched == singles
