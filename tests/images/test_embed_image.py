"""The worker image variant that carries the built-in `embed` model (`EXTRAS=embed`).

The model's weights ship inside its wheel: the image must load and run it with no network at
all, and a worker container started with TASK_HANDLER=embed must answer embed tasks.
"""

from __future__ import annotations

import json

import httpx
import pytest

from fastapi_redis_mini_harness.redis_server import RedisServer

from ..support.docker import (
    BuiltImage,
    embed_worker_image,
    report,
    run_once,
    skip_module_without_engine,
)
from .test_images import running_stack, wait_until_status

pytestmark = pytest.mark.slow
skip_module_without_engine()

DIM = 256
# What the model and numpy may add on top of the plain worker image.
MAX_EMBED_EXTRA_MB = 200


@pytest.fixture(scope="module")
def embed_image(images: dict[str, BuiltImage]) -> BuiltImage:
    image = embed_worker_image()
    added = (image.size_bytes - images["worker"].size_bytes) / 1e6
    report(f"{image.tag}: {image.size_mb:.1f} MB, {added:.1f} MB more than the plain worker")
    return image


def test_the_embed_image_runs_its_model_with_no_network(embed_image: BuiltImage) -> None:
    probe = (
        "import json;"
        "from fastapi_redis_mini.core.embedding import EmbedModel;"
        "m = EmbedModel(60.0); m.load();"
        "out = m(['a cat sat on the mat', 'a cat sat on the mat', 'quarterly tax filing'],"
        " [{}, {'pair': 'a kitten sat on the rug'}, {'pair': 'a kitten sat on the rug'}]);"
        "print(json.dumps(out))"
    )
    proc = run_once(embed_image.tag, ["-c", probe], entrypoint="python", network="none")
    assert proc.returncode == 0, proc.stderr
    vector, near, far = json.loads(proc.stdout)
    assert vector["dim"] == DIM
    assert len(vector["embedding"]) == DIM
    assert abs(sum(x * x for x in vector["embedding"]) - 1.0) < 1e-3  # unit length
    assert near["score"] > far["score"]


def test_the_embed_variant_adds_only_the_model_and_its_libraries(
    embed_image: BuiltImage, images: dict[str, BuiltImage]
) -> None:
    added_mb = (embed_image.size_bytes - images["worker"].size_bytes) / 1e6
    assert 0 < added_mb < MAX_EMBED_EXTRA_MB, f"the embed extra adds {added_mb:.1f} MB"


def test_an_embed_worker_container_answers_embed_tasks(
    embed_image: BuiltImage, images: dict[str, BuiltImage], redis_server: RedisServer
) -> None:
    variant = {**images, "worker": embed_image}
    with running_stack(variant, redis_server, TASK_HANDLER="embed") as stack:
        body = {"prompt": "the weather is sunny today", "params": {}}
        response = httpx.post(f"{stack.api_url}/tasks", json=body, timeout=10.0)
        assert response.status_code == 202, response.text
        task = wait_until_status(
            stack.api_url, response.json()["task_id"], {"DONE", "FAILED"}, timeout=60.0
        )
        assert task["status"] == "DONE", task
        assert task["result"]["dim"] == DIM
        assert len(task["result"]["embedding"]) == DIM
