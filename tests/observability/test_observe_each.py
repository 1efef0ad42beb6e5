"""observe_each, the worker's batch observe, exposes exactly what observe() one by one does."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fastapi_redis_mini.core.telemetry.metrics import RUN_BUCKETS, observe_each


def histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("run_seconds", "Runs.", buckets=RUN_BUCKETS, registry=registry)


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, sample.labels.get("le", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def values() -> list[float]:
    draw = random.Random(7)
    # Every bucket's own bound (a value on a bound counts in that bucket), values between
    # bounds, zero, and values past the last bound (+Inf only).
    around = [b for bound in RUN_BUCKETS for b in (bound, bound * 0.999, bound * 1.001)]
    return [0.0, *around, 1e6, *(draw.expovariate(0.2) for _ in range(500))]


def test_a_batch_observed_at_once_exposes_what_observing_it_value_by_value_does() -> None:
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    single, batch = histogram(one_by_one), histogram(batched)
    observed = values()
    for value in observed:
        single.observe(value)
    observe_each(batch, observed[:100])
    observe_each(batch, [])
    observe_each(batch, observed[100:])

    expected, got = samples(one_by_one), samples(batched)
    # The sum is added up in another order: equal but for the float rounding of the last digit.
    assert got.pop(("run_seconds_sum", "")) == pytest.approx(expected.pop(("run_seconds_sum", "")))
    assert got == expected
    assert got[("run_seconds_count", "")] == len(observed)
    assert got[("run_seconds_bucket", "+Inf")] == len(observed)
    past_the_last_bound = sum(v > RUN_BUCKETS[-1] for v in observed)
    assert got[("run_seconds_bucket", "600.0")] == len(observed) - past_the_last_bound
    assert past_the_last_bound > 0


def test_a_histogram_with_labels_is_refused_as_observe_refuses_it() -> None:
    labelled = Histogram("by_handler_seconds", "Runs.", ["handler"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="missing label values") as by_observe:
        labelled.observe(1.0)
    with pytest.raises(ValueError, match="missing label values") as by_batch:
        observe_each(labelled, [1.0])
    assert str(by_batch.value) == str(by_observe.value)
