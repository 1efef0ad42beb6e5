"""The built-in `embed` handler: a real model that runs offline, on the CPU, in batches.

WordLlama (the `embed` extra: `pip install 'fastapi-redis-mini[embed]'`) is a static
embedding model whose weights and tokenizer ship inside its wheel. This module imports it only
in `load()`, so the api, which imports handler modules for their `Params`, needs no extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

CONFIG = "l2_supercat"
DIM = 256
# Results are stored as JSON; 7 decimals keep a unit vector's float32 components exact enough
# and the answer compact (about 2.5 kB for 256 dimensions).
_DIGITS = 7


class EmbedParams(BaseModel):
    """Without `pair`: the prompt's embedding. With it: how alike the two texts are."""

    model_config = ConfigDict(extra="forbid")

    pair: StrictStr | None = Field(
        default=None,
        min_length=1,
        max_length=8192,
        description="A second text: answer their cosine similarity instead of an embedding.",
    )


class EmbedModel:
    """WordLlama l2_supercat, 256 dimensions, unit-length embeddings; synchronous and batched.

    A batch is one `embed()` call over every text in it (pairs contribute both texts), so the
    tokenizer and the matrix product see the whole batch at once. It runs in the worker's
    thread pool: numpy and the tokenizer release the GIL for most of their work.
    """

    Params = EmbedParams
    # On a CPU a batch of 32 costs about as much per text as one of 64, and a worker with
    # MAX_CONCURRENCY 64 then holds a second batch filling while one runs. With batches of 64
    # the model idled while each next batch was read and started, and tasks waited 5 to 10
    # times longer for DONE at the same rate (docs/BENCHMARKS.md, Inference).
    max_batch_size = 32
    max_batch_wait_ms = 2.0
    max_batches_in_flight = 1  # two at once drained no faster on two shared cores

    def __init__(self, max_duration: float) -> None:
        self.model: Any = None
        self.name = f"wordllama-{CONFIG}-{DIM}"

    def load(self) -> None:
        try:
            import wordllama
        except ImportError:
            raise RuntimeError(
                "the embed handler needs the embed extra: pip install 'fastapi-redis-mini[embed]'"
            ) from None
        # The wheel holds tokenizers/ and weights/ in the package folder, where load() does
        # not look for the tokenizer (it looks in tokenizer/). As its cache folder they are
        # found, and nothing is downloaded.
        bundled = Path(wordllama.__file__).parent
        self.model = wordllama.WordLlama.load(
            config=CONFIG, cache_dir=bundled, dim=DIM, disable_download=True
        )

    def close(self) -> None:
        self.model = None

    def __call__(self, prompts: list[str], params: list[Mapping[str, Any]]) -> list[Any]:
        if self.model is None:
            raise RuntimeError("the embed handler was called before load()")
        options: list[EmbedParams | Exception] = []
        texts: list[str] = []
        for prompt, item in zip(prompts, params, strict=True):
            try:
                option = EmbedParams.model_validate(item)
            except ValidationError as error:
                options.append(ValueError(f"params: {error.errors()[0]['msg']}"))
                continue
            options.append(option)
            texts.append(prompt)
            if option.pair is not None:
                texts.append(option.pair)
        import numpy as np  # the embed extra's, as load() imports wordllama

        vectors = self.model.embed(texts, norm=True) if texts else []
        # Rounded in one numpy call: the same numbers as round(float(x), 7) for each
        # component, at 3 µs a text instead of 78, four times what the model itself costs.
        rounded = np.round(np.asarray(vectors, dtype=np.float64), _DIGITS).tolist()
        answers: list[Any] = []
        row = 0
        for parsed in options:
            if isinstance(parsed, Exception):
                answers.append(parsed)
                continue
            if parsed.pair is None:
                answers.append({"model": self.name, "dim": DIM, "embedding": rounded[row]})
                row += 1
            else:
                score = float(vectors[row] @ vectors[row + 1])
                row += 2
                answers.append({"model": self.name, "score": round(score, _DIGITS)})
        return answers
