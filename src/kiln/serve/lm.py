"""Language-model bundles made ready to answer requests: generation and embedding.

A :class:`ServedLM` is a generation bundle loaded for serving: its generator (the
runtime its manifest records: torch, or onnxruntime-genai) behind one
:class:`~kiln.serve.engine.GenerationEngine`, which admits and schedules the requests
of every deployment routed to it. Loading warms it up with one short generation, so
the first request does not pay for lazy initialisation. :meth:`ServedLM.close` lets
the running and waiting sequences finish, then stops the engine's thread.

A :class:`ServedEmbedder` is an embedding bundle: texts in, (N, D) float32 unit
vectors out. Requests are not batched here; the caller sends each request's texts
in one call. Forward passes run one at a time, on the embedder's own thread
(:meth:`ServedEmbedder.embed_async`), so concurrent requests never compete for the
cores.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kiln.errors import DataError, SpecError

if TYPE_CHECKING:
    from kiln.lm_bundle import EmbeddingBundle, LMBundle
    from kiln.manifest import BundleMeta
    from kiln.serve.engine import GenerationEngine

WARM_UP_PROMPT = "Hello"


class ServedLM:
    """One version of a generation model, loaded, warmed up, behind its engine.

    ``max_num_seqs`` sequences decode at once and ``max_queue`` wait (the deployment's
    ``max_batch_size`` and ``max_queue``); ``backend`` is the deployment's setting:
    ``auto``, or the name of the runtime the bundle records (``torch``), else a
    SpecError naming ``backend``. Blocking (it loads weights): build it off the event
    loop.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_num_seqs: int = 8,
        max_queue: int = 64,
        backend: str = "auto",
    ) -> None:
        from kiln.lm_bundle import LMBundle
        from kiln.serve.engine import GenerationEngine

        started = time.perf_counter()
        self.bundle: LMBundle = LMBundle.load(path)
        generator = self.bundle.generator
        self.backend_name: str = generator.name
        if backend not in ("auto", self.backend_name):
            raise SpecError(
                f"backend: this generation model runs on the runtime its bundle records "
                f"({self.backend_name}); use auto",
                field="backend",
            )
        self.warm_up()
        self.engine: GenerationEngine = GenerationEngine(
            generator, max_num_seqs=max_num_seqs, max_queue=max_queue
        )
        gc.freeze()  # as ServedModel: what loading made lives as long as the server
        self.load_seconds = time.perf_counter() - started

    @property
    def meta(self) -> BundleMeta:
        return self.bundle.meta

    @property
    def task(self) -> str:
        return self.bundle.meta.task

    def warm_up(self) -> None:
        """One greedy token of a short prompt (the first request's lazy set-up)."""
        ids = self.bundle.prompt_ids(WARM_UP_PROMPT)
        params = self.bundle.params(max_new_tokens=1, temperature=0.0)
        self.bundle.generator.generate([ids], params)

    async def close(self) -> None:
        """Finish the running and waiting sequences, then stop the engine."""
        await self.engine.close()


class ServedEmbedder:
    """One version of an embedding model, loaded and warmed up (blocking: off the loop).

    ``backend`` is the deployment's setting: ``auto`` or ``torch`` (an embedding model
    runs on torch), else a SpecError naming ``backend``.
    """

    def __init__(self, path: str | Path, *, backend: str = "auto") -> None:
        from kiln.lm_bundle import EmbeddingBundle

        started = time.perf_counter()
        if backend not in ("auto", "torch"):
            raise SpecError(
                "backend: an embedding model runs on torch; use auto or torch", field="backend"
            )
        self.bundle: EmbeddingBundle = EmbeddingBundle.load(path)
        self.backend_name = "torch"
        self._lock = threading.Lock()  # one forward pass at a time
        # one thread: requests of one version never compete for the cores
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-embed")
        self.embed([WARM_UP_PROMPT])  # warm-up
        gc.freeze()
        self.load_seconds = time.perf_counter() - started

    @property
    def meta(self) -> BundleMeta:
        return self.bundle.meta

    @property
    def task(self) -> str:
        return self.bundle.meta.task

    @property
    def dimensions(self) -> int:
        """The length of every vector."""
        return self.bundle.dimensions

    @property
    def max_tokens(self) -> int:
        """The most tokens of one text the model reads; longer texts are truncated."""
        return int(getattr(self.bundle.meta.model, "max_length", 256))

    def embed(self, texts: list[str], field: str = "input") -> np.ndarray:
        """(N, D) float32 unit vectors, one per text, in order (blocking).

        An empty list or a non-string is a DataError naming ``field`` (``input[i]``).
        """
        _check_texts(texts, field)
        with self._lock:
            vectors = self.bundle.embed(texts)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    async def embed_async(self, texts: list[str], field: str = "input") -> np.ndarray:
        """:meth:`embed` on the embedder's own thread (call from the event loop)."""
        _check_texts(texts, field)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.embed, texts, field)

    def count_tokens(self, texts: list[str]) -> int:
        """The tokens the model reads of ``texts`` (special tokens included, each text
        truncated to :attr:`max_tokens`): the request's ``usage``."""
        tokenizer = self.bundle.tokenizer
        encoded = tokenizer(list(texts), truncation=True, max_length=self.max_tokens)
        return sum(len(ids) for ids in encoded["input_ids"])

    async def close(self) -> None:
        """Finish the forward passes already asked for, then stop the thread."""
        await asyncio.to_thread(self._executor.shutdown, wait=True)


def _check_texts(texts: list[str], field: str) -> None:
    if not isinstance(texts, list) or not texts:
        raise DataError(f"{field}: at least one text is needed", field=field)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{field}[{i}]: expected a string", field=f"{field}[{i}]")
