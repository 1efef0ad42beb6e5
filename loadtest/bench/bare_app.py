"""The api benchmark's baseline: the same routes, body models and answers, without Redis.

It validates the request with the service's own TaskCreate and answers with its own
TaskSubmitted / Task, so the difference to the real api is the cost of the queue,
the middleware and the checks, not of FastAPI or pydantic. Served by gunicorn with the same
uvicorn worker class and worker count as the real api.
"""

from __future__ import annotations

import time
import uuid

from fastapi import FastAPI, Response, status

from fastapi_redis_mini.core.models import Task, TaskCreate, TaskStatus, TaskSubmitted

HIT_PROMPT = "bench hit"
_RESULT = {"model": "bench", "output": "ok", "prompt_tokens": 2, "completion_tokens": 1}

app = FastAPI(title="bare baseline")


@app.post("/tasks", status_code=status.HTTP_202_ACCEPTED, response_model=TaskSubmitted)
async def submit_task(task: TaskCreate, response: Response) -> TaskSubmitted:
    """Answer like the real api: 200 with a result for the warmed-up prompt, else 202."""
    if task.prompt == HIT_PROMPT:
        response.status_code = status.HTTP_200_OK
        return TaskSubmitted(
            task_id=uuid.uuid4().hex, status=TaskStatus.DONE, cached=True, result=_RESULT
        )
    return TaskSubmitted(task_id=uuid.uuid4().hex, status=TaskStatus.PENDING, cached=False)


@app.get("/tasks/{task_id}", response_model=Task)
async def get_task(task_id: str) -> Task:
    """A finished task, as the real api shows one."""
    now = time.time()
    return Task(
        task_id=task_id,
        status=TaskStatus.DONE,
        result=_RESULT,
        attempts=1,
        created_at=now,
        started_at=now,
        finished_at=now,
    )


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
