"""The index refresh of end-to-end retriever training (``train.index_refresh=full``; REALM,
rag-end2end, Atlas "full"): a deterministic schedule, background builds, swaps at fixed steps.

Every ``reindex_every`` steps (after step ``s``, ``s`` a positive multiple) a snapshot of the document
encoder is taken and, in a background thread while training goes on, re-embeds the whole corpus and
builds a new index: the *generation* ``s`` (``rag_jax.retrieval.generations``, in the run directory).
It retrieves for every step after ``s + reindex_lag`` (the batch of step ``s + lag + 1`` onwards);
until then the previous generation does (0: the run's own corpus index). When the build has not
finished by then, training waits at that step and logs the wait. ``reindex_lag < reindex_every``, so
at most one generation is being built at a time.

The schedule depends on the step alone, so a run retrieves from the same generations whether it was
interrupted or not: a checkpoint holds the snapshots of the generation in use and of the one being
built (``checkpoint_snapshots``), and a resumed run reloads the first (rebuilding it from its snapshot
when its folder is missing or unfinished) and rebuilds the second (the embedding job resumes its
shards). Builds are byte-for-byte deterministic, so the per-step losses are an uninterrupted run's.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax

from rag_jax.models.encoder import Encoder
from rag_jax.retrieval import IndexGenerations, build_generation, index_kind, snapshot_encode_fn

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RefreshSchedule:
    """When generations are snapshotted and swapped in (steps count completed optimizer steps; the
    batch of step ``t`` is the ``t``-th step's)."""

    every: int
    lag: int

    def __post_init__(self):
        if not 0 <= self.lag < self.every:
            raise ValueError(f"reindex_lag must be in [0, reindex_every={self.every}), got {self.lag}")

    def is_snapshot(self, completed: int) -> bool:
        """Whether a snapshot is taken after step ``completed``."""
        return completed > 0 and completed % self.every == 0

    def generation_for(self, step: int) -> int:
        """The generation that retrieves the batch of ``step``: the latest snapshot ``s`` with
        ``s + lag < step``; 0 (the run's corpus) before the first swap."""
        return max((step - 1 - self.lag) // self.every * self.every, 0)

    def pending_at(self, completed: int) -> int | None:
        """The generation being built after ``completed`` steps (snapshotted, not yet retrieving), or None."""
        s = completed // self.every * self.every
        return s if s > 0 and s > self.generation_for(completed + 1) else None

    def next_swap(self, completed: int) -> int:
        """The first step ``b > completed`` after which the generation changes (``s + lag``)."""
        m = max(1, (completed - self.lag) // self.every + 1)
        return m * self.every + self.lag


Corpus = Any  # (index, embeddings) of one generation
BuildFn = Callable[[int, Any], Corpus]  # (snapshot step, document-encoder parameters) -> the generation, built
LoadFn = Callable[[int], Corpus]  # snapshot step -> its corpus (None when its folder is unfinished or missing)
PruneFn = Callable[[set], None]  # remove every generation folder but these steps


class IndexRefresher:
    """Builds generations in one background thread and hands out the one each step retrieves from.

    ``build(step, params)`` writes generation ``step`` (resumable) and returns its corpus; ``load(step)``
    returns it, or None when it is not complete on disk; ``prune(steps)`` removes the other generations
    (the previous one is kept with the current one: the last two); ``original`` is generation 0's corpus
    and ``initial_params`` the document encoder it was embedded with. Call ``resume`` once, then
    ``after_step`` after every optimizer step and ``corpus_for`` before retrieving a step's batch
    (both from the training loop's thread)."""

    def __init__(self, schedule: RefreshSchedule, build: BuildFn, load: LoadFn, prune: PruneFn, original: Corpus,
                 initial_params):  # fmt: skip
        self.schedule = schedule
        self._build, self._load, self._prune = build, load, prune
        self._corpus = original  # the current generation's
        self.snapshots = {0: initial_params}
        self.current = 0
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reindex")
        self.build_seconds = 0.0  # summed over finished builds (background)
        self.wait_seconds = 0.0  # training blocked on a build

    def resume(self, completed: int, snapshots: dict[int, Any]) -> None:
        """State after ``completed`` steps from a checkpoint's ``snapshots`` ({generation step: params}):
        the generation in use is loaded (rebuilt first when its folder is unfinished or lost), the
        pending one is rebuilt in the background."""
        self.snapshots.update(snapshots)
        current = self.schedule.generation_for(completed + 1)
        if current:
            corpus = self._load(current)
            if corpus is None:
                log.warning("index generation %d is missing or unfinished: rebuilding it from its snapshot", current)
                self._submit(current)
            self._swap_to(current, corpus)
        pending = self.schedule.pending_at(completed)
        if pending is not None:
            self._submit(pending)

    def after_step(self, completed: int, doc_params: Callable[[], Any]) -> None:
        """Snapshot the document encoder (``doc_params()``, a copy) and start a build when the
        schedule says so."""
        if self.schedule.is_snapshot(completed):
            self.snapshots[completed] = doc_params()
            self._submit(completed)

    def corpus_for(self, step: int) -> Corpus:
        """The corpus that retrieves the batch of ``step`` (waiting for its build if it has to)."""
        generation = self.schedule.generation_for(step)
        if generation != self.current:
            self._swap_to(generation, None if generation in self._futures else self._load(generation))
        return self._corpus

    def checkpoint_snapshots(self, completed: int) -> dict:
        """``{"current", "pending"}``: the snapshots of the generation retrieving after ``completed``
        steps and of the one being built (the current one's when none is), for the checkpoint."""
        current = self.snapshots[self.schedule.generation_for(completed + 1)]
        pending = self.schedule.pending_at(completed)
        return {"current": current, "pending": current if pending is None else self.snapshots[pending]}

    def close(self) -> None:
        """Wait for a build in progress (its folder then is complete) and stop the thread."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, step: int) -> None:
        if step not in self._futures:
            self._futures[step] = self._pool.submit(self._timed_build, step, self.snapshots[step])

    def _timed_build(self, step: int, params) -> Corpus:
        start = time.perf_counter()
        corpus = self._build(step, params)
        self.build_seconds += time.perf_counter() - start
        return corpus

    def _swap_to(self, generation: int, corpus: Corpus = None) -> None:
        future = self._futures.pop(generation, None)
        if future is not None:
            if not future.done():
                log.warning("waiting for index generation %d (re-embedding the corpus) before the next step",
                            generation)  # fmt: skip
            start = time.perf_counter()
            corpus = future.result()  # a failed build raises here, in the training loop
            self.wait_seconds += time.perf_counter() - start
        if corpus is None:
            raise RuntimeError(f"index generation {generation} is not complete")
        self._prune({self.current, generation, *self._futures})
        self._corpus = corpus
        self.snapshots = {s: p for s, p in self.snapshots.items() if s >= generation}
        self.current = generation


SHARD_SIZE = 1 << 16  # passages per embedding shard of a generation (the unit a resumed or split build redoes)


def run_refresher(cfg, doc_encoder: Encoder, initial_params, retriever, doc_inputs, *, progress: bool = False
                  ) -> IndexRefresher:  # fmt: skip
    """The ``IndexRefresher`` of a run: generations in ``run_dir/index_generations`` over the retriever's
    passages, indexed like ``corpus.index`` (exact or ScaNN), embedded by ``doc_encoder`` with a
    snapshot's parameters reading ``doc_inputs`` (``components.DocInputs``), each build split over the
    run's processes (process 0 prunes)."""
    t = cfg.train
    generations = IndexGenerations(os.path.join(cfg.run_dir, "index_generations"))
    kind = index_kind(cfg.corpus.index)
    store = retriever.store
    process_index, process_count = jax.process_index(), jax.process_count()

    def build(step: int, params) -> Corpus:
        return build_generation(
            generations, step, store, snapshot_encode_fn(doc_encoder, params), doc_inputs.tokenize, index_kind=kind,
            batch_size=t.reindex_batch_size, shard_size=SHARD_SIZE, input_mode=doc_inputs.input_mode,
            process_index=process_index, process_count=process_count, encoder_name=f"document encoder at step {step}",
            progress=progress,
        )  # fmt: skip

    def load(step: int) -> Corpus:
        return generations.load(step, store) if generations.is_complete(step) else None

    def prune(keep: set) -> None:
        if process_index == 0:
            generations.prune(keep)

    schedule = RefreshSchedule(t.reindex_every, t.reindex_lag)
    return IndexRefresher(schedule, build, load, prune, (retriever.index, retriever.embeddings), initial_params)
