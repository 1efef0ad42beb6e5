"""Log lines carry a timestamp with its UTC offset, in both formats."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime

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
