"""A task as the service reports it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class TaskStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"  # not started by its deadline; it never ran

    @property
    def is_final(self) -> bool:
        return self in {TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED,
                        TaskStatus.EXPIRED}  # fmt: skip


class Priority(StrEnum):
    """The lane a task waits in; workers prefer higher lanes."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


@dataclass(frozen=True)
class Schedule:
    """When and in which lane a task runs: each field is optional, and left out when None.

    `run_at` is a datetime with a time zone or Unix seconds; give it or `delay_seconds`, not
    both. A task not started within `deadline_seconds` of when it is due ends EXPIRED.
    """

    priority: Priority | str | None = None
    delay_seconds: float | None = None
    run_at: datetime | float | None = None
    deadline_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        fields = {
            "priority": None if self.priority is None else str(self.priority),
            "delay_seconds": self.delay_seconds,
            "run_at": self.run_at.isoformat() if isinstance(self.run_at, datetime)
            else self.run_at,
            "deadline_seconds": self.deadline_seconds,
        }  # fmt: skip
        return {name: value for name, value in fields.items() if value is not None}


@dataclass(frozen=True)
class Task:
    """One task. A submit's answer carries task_id, status, cached, result and coalesced; a
    read carries all but coalesced."""

    task_id: str
    status: TaskStatus
    cached: bool = False
    result: Any = None
    error: str | None = None
    attempts: int = 0
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    progress: float | None = None  # the latest progress the handler reported, 0 to 1
    progress_message: str | None = None
    # A submit's answer: True when an identical request was in flight and this is its task.
    coalesced: bool = False
    priority: str = "normal"
    run_at: float | None = None  # a delayed task: when it is due (Unix seconds)
    deadline_at: float | None = None  # not started by then (Unix seconds): EXPIRED

    @property
    def is_final(self) -> bool:
        return self.status.is_final

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Task:
        """Build from an answer's JSON; fields this client does not know yet are ignored."""
        if not isinstance(body, dict):
            raise TypeError(f"a task is a JSON object, not {type(body).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        values = {name: value for name, value in body.items() if name in known}
        values["status"] = TaskStatus(body["status"])
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"status": self.status.value}
