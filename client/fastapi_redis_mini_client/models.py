"""A task as the service reports it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class TaskStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in {TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED}


@dataclass(frozen=True)
class Task:
    """One task. A submit's answer carries only the first four fields; a read carries all."""

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
