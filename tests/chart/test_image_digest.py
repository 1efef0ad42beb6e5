"""Images pinned by digest: a digest beside any image's tag replaces the tag in every pod that
runs the image, and a digest that is not one is refused before anything renders."""

from __future__ import annotations

import pytest

from .helm import Rendered, RenderError, Values, pod_spec, render

DIGEST = "sha256:" + "0123456789abcdef" * 4

# Every image the chart runs, with the values that put it in some pod.
IMAGES: dict[str, tuple[str, Values]] = {
    "api": ("fastapi-redis-mini-api", {}),
    "worker": ("fastapi-redis-mini-worker", {}),
    "redis": ("redis", {"redis": {"mode": "cluster"}, "api": {"submitRatePerKey": 0}}),
    "redis.metrics": ("oliver006/redis_exporter", {"redis": {"metrics": {"enabled": True}}}),
    "loadtest": ("locustio/locust", {"loadtest": {"enabled": True, "job": {"enabled": True}}}),
}


def with_digest(path: str, base: Values, digest: str) -> Values:
    values: Values = {key: dict(value) for key, value in base.items()}
    node = values
    for key in path.split("."):
        node = node.setdefault(key, {})
    node["image"] = {"digest": digest}
    return values


def images(objects: list[Rendered]) -> list[str]:
    found = []
    for obj in objects:
        if obj.kind in ("Deployment", "StatefulSet", "Job", "Pod"):
            spec = pod_spec(obj.manifest)
            for container in spec.get("initContainers", []) + spec["containers"]:
                found.append(str(container["image"]))
    return found


@pytest.mark.parametrize("path", IMAGES)
def test_a_digest_pins_every_container_of_the_image_and_the_tag_is_ignored(path: str) -> None:
    repository, base = IMAGES[path]
    tagged = [image for image in images(render(base)) if image.startswith(repository + ":")]
    assert tagged, f"{path}: no container runs {repository}"

    pinned = images(render(with_digest(path, base, DIGEST)))
    assert pinned.count(f"{repository}@{DIGEST}") == len(tagged)
    assert not [image for image in pinned if image.startswith(repository + ":")]


def test_without_a_digest_every_default_image_is_pulled_by_tag() -> None:
    everything = {**IMAGES["redis"][1], **IMAGES["loadtest"][1]}
    everything["redis"] = {"mode": "cluster", "metrics": {"enabled": True}}
    for image in images(render(everything)):
        assert "@" not in image, image
        assert ":" in image.rpartition("/")[2], image


@pytest.mark.parametrize(
    "digest",
    [
        "0123456789abcdef" * 4,  # no algorithm
        "sha256:" + "0123456789abcdef" * 3,  # too short
        "sha256:" + "0123456789ABCDEF" * 4,  # upper case is not how registries print it
        "sha512:" + "0123456789abcdef" * 8,
        "7.4.6-bookworm",  # a tag in the wrong field
    ],
)
@pytest.mark.parametrize("path", ["api", "redis", "redis.metrics"])
def test_a_malformed_digest_is_refused_naming_the_field(path: str, digest: str) -> None:
    with pytest.raises(RenderError, match=r"image.*digest|digest.*image"):
        render(with_digest(path, {}, digest))
