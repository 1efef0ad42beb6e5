"""The built-in `embed` handler: a real model (WordLlama, from its wheel, offline) in a worker."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pytest

from fastapi_redis_mini.core.embedding import DIM, EmbedModel
from fastapi_redis_mini.core.handlers import handler_params, resolve_handler
from fastapi_redis_mini.core.models import TaskCreate, TaskStatus, request_signature
from fastapi_redis_mini.core.queue import SubmitOutcome
from fastapi_redis_mini.core.redis import RedisTaskQueue, connect
from fastapi_redis_mini.core.settings import Settings
from fastapi_redis_mini.worker.runner import Worker

pytest.importorskip("wordllama", reason="the embed extra is not installed")

SIMILAR = ("The cat sits on the mat.", "A cat is sitting on a mat.")
UNRELATED = ("The cat sits on the mat.", "Stock markets fell sharply today.")


@pytest.fixture(scope="module")
def model() -> Iterator[EmbedModel]:
    model = EmbedModel(1)
    model.load()
    yield model
    model.close()


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def test_embed_is_a_registered_handler_with_its_params_model() -> None:
    assert isinstance(resolve_handler("embed", 1), EmbedModel)
    params = handler_params("embed")
    assert params is not None
    with pytest.raises(ValueError, match="pair"):
        params.model_validate({"pair": 3})


def test_an_embedding_is_a_unit_vector_and_the_same_for_the_same_text(model: EmbedModel) -> None:
    first, again, other = model(["a red apple", "a red apple", "a blue car"], [{}, {}, {}])
    assert first["dim"] == DIM
    assert len(first["embedding"]) == DIM
    assert abs(norm(first["embedding"]) - 1) < 1e-5
    assert first == again
    assert first["embedding"] != other["embedding"]
    # The same text alone and in a batch: batching does not change an answer.
    assert model(["a red apple"], [{}])[0] == first


def test_components_are_the_models_floats_rounded_to_seven_decimals(model: EmbedModel) -> None:
    texts = [f"sentence {i} about a cat and a mat" for i in range(200)]
    raw = model.model.embed(texts, norm=True)
    answers = model(texts, [{}] * len(texts))
    for vector, answer in zip(raw, answers, strict=True):
        assert answer["embedding"] == [round(float(x), 7) for x in vector]
    # In a mixed batch the pairs take two rows each: the embeddings still line up.
    mixed = model(["a", texts[0], "b", texts[1]], [{"pair": "x"}, {}, {"pair": "y"}, {}])
    assert [mixed[1]["embedding"], mixed[3]["embedding"]] == [
        answers[0]["embedding"],
        answers[1]["embedding"],
    ]


def test_a_pair_is_scored_plausibly(model: EmbedModel) -> None:
    similar, unrelated = model(
        [SIMILAR[0], UNRELATED[0]], [{"pair": SIMILAR[1]}, {"pair": UNRELATED[1]}]
    )
    assert similar["score"] > 0.7
    assert unrelated["score"] < 0.3


def test_a_bad_item_fails_alone(model: EmbedModel) -> None:
    answers: list[Any] = model(["fine", "bad"], [{}, {"pair": ""}])
    assert len(answers[0]["embedding"]) == DIM
    assert isinstance(answers[1], ValueError)


async def test_a_worker_embeds_and_the_repeat_comes_from_the_cache(
    queue: RedisTaskQueue, settings: Settings
) -> None:
    configured = settings.model_copy(update={"task_handler": "embed", "max_concurrency": 8})
    own = RedisTaskQueue(connect(configured), configured)
    worker = Worker(own, resolve_handler("embed", 1), configured)
    running = asyncio.create_task(worker.run())
    tasks = [
        TaskCreate(prompt="the weather is nice today"),
        TaskCreate(prompt=SIMILAR[0], params={"pair": SIMILAR[1]}),
    ]
    ids = [(await queue.submit(t, signature=request_signature(t))).task_id for t in tasks]
    records = [await queue.wait(task_id, "", 20) for task_id in ids]
    repeats = [await queue.submit(t, signature=request_signature(t)) for t in tasks]
    worker.stop()
    await asyncio.wait_for(running, 20)
    await own.close()
    assert [r.status for r in records if r is not None] == [TaskStatus.DONE] * 2
    embedded, scored = (r.result if r is not None else None for r in records)
    assert embedded is not None
    assert scored is not None
    assert len(embedded["embedding"]) == DIM
    assert scored["score"] > 0.7
    assert [r.outcome for r in repeats] == [SubmitOutcome.CACHED] * 2
    assert [r.result for r in repeats] == [embedded, scored]
