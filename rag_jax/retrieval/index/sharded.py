"""ShardedIndex: several indexes (ScaNN or exact), each over a contiguous range of rows, searched
one by one and merged into one global top-k.

Shard ``s`` covers rows ``offsets[s] .. offsets[s] + size_s - 1`` and returns local rows, shifted
back by its offset before ``merge_topk``. Each shard is saved in its own subfolder
(``shard-00000/`` ...), a complete index of its own, so shards can be loaded and searched in other
processes or hosts; their partial results are then combined with the pure function
``index.merge_topk``. A ScaNN shard trains its tree and AH codebooks on a sample of its own rows
(ScaNN cannot share a trained tree between searchers; see ``scann_index``).

Live updates: ``upsert`` sends each row to the shard that holds it and new rows to the last shard;
``delete`` deletes within each shard (``base.delete_layout`` per shard), so the returned layout is the
shards' layouts one after the other and the offsets shift by the rows deleted before them.
``ProcessShardedIndex`` has no updates: update the saved ``ShardedIndex`` and load it again.
"""

from __future__ import annotations

import os
from typing import Sized

import numpy as np
from jax.experimental import multihost_utils

from rag_jax.retrieval.embed import load_embeddings
from rag_jax.retrieval.index.base import (
    check_build_inputs,
    check_delete_rows,
    check_queries,
    check_upsert,
    merge_topk,
    read_meta,
    write_meta,
)
from rag_jax.retrieval.index.collective import gather_queries
from rag_jax.retrieval.index.exact import ExactIndex
from rag_jax.retrieval.index.scann import ScannIndex

KINDS = {"exact": ExactIndex, "scann": ScannIndex}


def shard_dir(directory: str, shard: int) -> str:
    return os.path.join(directory, f"shard-{shard:05d}")


class ShardedIndex:
    """Shards searched in turn; ``search`` takes the shard indexes' own keyword arguments."""

    def __init__(self, shards: list, offsets: list[int], kind: str):
        if len(shards) != len(offsets) or not shards:
            raise ValueError(f"{len(shards)} shards but {len(offsets)} offsets")
        dims = {s.dim for s in shards}
        if len(dims) != 1:
            raise ValueError(f"shards have different dims: {sorted(dims)}")
        expected = np.cumsum([0] + [s.size for s in shards[:-1]]).tolist()
        if list(offsets) != expected:
            raise ValueError(f"shard offsets {list(offsets)} do not tile the rows (expected {expected})")
        self.shards, self.offsets, self.kind = shards, list(offsets), kind
        self.dim, self.size = dims.pop(), sum(s.size for s in shards)

    def search(self, queries: np.ndarray, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        q = check_queries(queries, self.dim, self.size, k)
        partial = []
        for shard, offset in zip(self.shards, self.offsets):
            ids, scores = shard.search(q, min(k, shard.size), **kwargs)
            partial.append((ids + offset, scores))
        return merge_topk(partial, k)

    def upsert(self, rows, vectors, **kwargs) -> None:
        """Replace rows below ``size`` and append rows ``size, size + 1, ...`` (``base.check_upsert``):
        each row in the shard that holds it, new rows in the last shard; ``kwargs`` go to the shards."""
        rows, vectors, _ = check_upsert(self.size, self.dim, rows, vectors)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1  # rows past the end: the last shard
        for s, (shard, offset) in enumerate(zip(self.shards, self.offsets)):
            if (shard_of == s).any():
                shard.upsert(rows[shard_of == s] - offset, vectors[shard_of == s], **kwargs)
        self._retile()

    def delete(self, rows) -> np.ndarray:
        """Remove ``rows``, each shard its own; returns ``source``, the old row now at each row."""
        rows = check_delete_rows(self.size, rows)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        source = np.concatenate([shard.delete(rows[shard_of == s] - offset) + offset
                                 for s, (shard, offset) in enumerate(zip(self.shards, self.offsets))])  # fmt: skip
        self._retile()
        return source

    def _retile(self) -> None:
        self.offsets = np.cumsum([0] + [s.size for s in self.shards[:-1]]).tolist()
        self.size = sum(s.size for s in self.shards)

    def save(self, directory: str) -> None:
        for s, shard in enumerate(self.shards):
            shard.save(shard_dir(directory, s))
        write_meta(directory, {"kind": "sharded", "shard_kind": self.kind, "size": self.size, "dim": self.dim,
                               "offsets": self.offsets, "sizes": [s.size for s in self.shards]})

    @classmethod
    def load(cls, directory: str, **kwargs) -> "ShardedIndex":
        """Load every shard; ``kwargs`` go to the shard class's ``load``."""
        meta = read_meta(directory, "sharded")
        shards = [KINDS[meta["shard_kind"]].load(shard_dir(directory, s), **kwargs) for s in range(len(meta["offsets"]))]
        return cls(shards, meta["offsets"], meta["shard_kind"])


class ProcessShardedIndex:
    """A sharded index split over the processes of a multi-host run (``jax.distributed``): process ``p``
    of ``P`` loads and holds only shards ``p, p + P, ...``, so each holds about 1/P of the index.

    ``search`` is collective, every process calls it with its own queries (any number, the same ``k``):
    the queries of all processes are gathered, each process searches them on its shards, and the
    per-process top-k (ids, scores) are gathered and merged with ``merge_topk`` (descending score, ties by
    ascending id): each process gets the global top-k of its own queries, exactly what one process with
    the whole ``ShardedIndex`` returns. Both gathers are jax's ``multihost_utils.process_allgather``."""

    def __init__(self, shards: list, offsets: list[int], kind: str, size: int, dim: int):
        self.shards, self.offsets, self.kind, self.size, self.dim = shards, list(offsets), kind, size, dim

    @classmethod
    def load(cls, directory: str, process_index: int, process_count: int, **kwargs) -> "ProcessShardedIndex":
        meta = read_meta(directory, "sharded")
        mine = range(process_index, len(meta["offsets"]), process_count)
        if not mine:
            raise ValueError(f"{directory}: {len(meta['offsets'])} shards cannot be split over {process_count} "
                             "processes (rebuild it with `rag-jax build-index --shards` at least the process count)")  # fmt: skip
        shards = [KINDS[meta["shard_kind"]].load(shard_dir(directory, s), **kwargs) for s in mine]
        return cls(shards, [meta["offsets"][s] for s in mine], meta["shard_kind"], meta["size"], meta["dim"])

    def search(self, queries: np.ndarray, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        every_q, own = gather_queries(check_queries(queries, self.dim, self.size, k))  # [P * width, D]
        missing = (np.full((len(every_q), k), -1, np.int64), np.full((len(every_q), k), -np.inf, np.float32))
        partial = [missing]  # fewer than k rows here: the other processes' candidates fill the top-k
        for shard, offset in zip(self.shards, self.offsets):
            ids, scores = shard.search(every_q, min(k, shard.size), **kwargs)
            partial.append((ids + offset, scores))
        local_ids, local_scores = merge_topk(partial, k)
        every_ids = multihost_utils.process_allgather(local_ids)  # [P, P * width, k]
        every_scores = multihost_utils.process_allgather(local_scores)
        ids, scores = merge_topk(list(zip(every_ids, every_scores)), k)
        return ids[own], scores[own]


def build_sharded(embeddings, num_shards: int, *, kind: str = "scann", passages: Sized | None = None, **build_kwargs) -> ShardedIndex:
    """Split the rows of ``embeddings`` (an array-like with row slices, or an embedding folder
    written by ``embed.embed_passages``, read memory-mapped) into ``num_shards`` near-equal
    contiguous ranges and build a ``kind`` index ("scann" or "exact") over each; only one shard's
    rows are copied into memory at a time. ``build_kwargs`` go to each shard's ``build``."""
    if isinstance(embeddings, (str, os.PathLike)):

        embeddings = load_embeddings(os.fspath(embeddings), mmap=True)
    n, _ = check_build_inputs(embeddings, passages)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if not 1 <= num_shards <= n:
        raise ValueError(f"num_shards={num_shards} must be between 1 and the number of rows {n}")
    bounds = np.linspace(0, n, num_shards + 1).round().astype(int).tolist()
    shards = [KINDS[kind].build(embeddings[a:b], **build_kwargs) for a, b in zip(bounds[:-1], bounds[1:])]
    return ShardedIndex(shards, bounds[:-1], kind)
