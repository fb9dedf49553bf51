"""What every MIPS index shares: the interface, argument checks, saved metadata, the top-k merge,
and a NumPy reference search.

An index maps query vectors to the rows of the embedding matrix with the largest inner products:

* ``Index.build(embeddings [N, D], ..., passages=None)`` (a classmethod) builds it; ``embeddings``
  is anything with ``shape`` and contiguous row slices (``np.ndarray``, ``np.memmap``,
  ``embed.EmbeddingShards``); ``passages`` (anything with ``len``), when given, must hold N items.
* ``index.search(queries [Q, D], k) -> (ids [Q, k] int64, scores [Q, k] float32)``, best first;
  ids are rows of the embedding matrix (= rows of the ``PassageStore``).
* ``index.save(directory)`` / ``Index.load(directory)``; ``load_index(directory)`` picks the class.
* ``index.dim``, ``index.size``.
* Live updates (``ExactIndex``, ``ScannIndex``, ``ShardedIndex``): ``index.upsert(rows, vectors)``
  replaces rows below ``size`` and appends rows ``size, size + 1, ...``; ``index.delete(rows) ->
  source`` removes rows and returns the new layout, ``source[i]`` the old row now at row ``i``:
  deleted from the highest row down, each deleted row takes the current last row's place
  (``delete_layout``, ScaNN's own order; a ``ShardedIndex`` does it within each shard). So rows below
  the new size that survive keep their number, the few survivors above it move into the holes, and a
  deleted row is never returned (it no longer exists). The passage store and the embeddings follow
  the same layout (``rag_jax.retrieval.update``).

Ties are ordered by ascending row everywhere (``merge_topk`` defines the order), so results are
deterministic. Implementations: ``exact.ExactIndex`` (on device), ``scann.ScannIndex``
(host), ``sharded.ShardedIndex`` (several of either over row ranges); ``load_index`` (this
package's ``__init__``) picks the class of a saved one.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence, Sized

import numpy as np

META_FILE = "index.json"


class Index(Protocol):
    dim: int
    size: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def save(self, directory: str) -> None: ...


def check_build_inputs(embeddings, passages: Sized | None = None) -> tuple[int, int]:
    """``(N, D)`` of an embedding matrix; refuses a non-matrix, an empty one, or a passage count
    that differs from N."""
    shape = tuple(embeddings.shape)
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] matrix, got shape {shape}")
    if passages is not None and len(passages) != shape[0]:
        raise ValueError(f"{shape[0]} embeddings but {len(passages)} passages: they must match row for row")
    return shape


def check_queries(queries, dim: int, size: int, k: int) -> np.ndarray:
    """Queries as a float32 [Q, D] array; refuses another dim, or k outside 1..size."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2:
        raise ValueError(f"queries must be [Q, D], got shape {q.shape}")
    if q.shape[1] != dim:
        raise ValueError(f"queries have dim {q.shape[1]} but the index has dim {dim}")
    check_k(k, size)
    return q


def check_k(k: int, size: int) -> None:
    """Refuses a top-k outside 1..size (the index's number of rows)."""
    if not 1 <= k <= size:
        raise ValueError(f"k={k} must be between 1 and the index size {size}")


def merge_topk(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The global top-k of several partial results ``(ids [Q, k_i], scores [Q, k_i])`` (from
    shards, processes or hosts; ids already global): ``(ids [Q, k] int64, scores [Q, k] float32)``,
    ordered by descending score, ties by ascending id. A pure function of its inputs."""
    if not results:
        raise ValueError("merge_topk needs at least one result")
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in results], axis=1)
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for _, s in results], axis=1)
    if ids.shape != scores.shape:
        raise ValueError(f"ids {ids.shape} and scores {scores.shape} do not match")
    if ids.shape[1] < k:
        raise ValueError(f"k={k} but the results hold only {ids.shape[1]} candidates per query")
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


def exact_search_numpy(embeddings, queries: np.ndarray, k: int, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force MIPS with NumPy (float32 matmuls over row blocks): the reference for tests and
    the CPU baseline of the benchmark. A tie at the k-th place within a block may keep either row."""
    n, dim = check_build_inputs(embeddings)
    q = check_queries(queries, dim, n, k)
    best = None
    for start in range(0, n, block):
        rows = np.asarray(embeddings[start : start + block], dtype=np.float32)
        scores_QxB = q @ rows.T
        kk = min(k, rows.shape[0])
        if kk < rows.shape[0]:
            top_QxK = np.argpartition(-scores_QxB, kk - 1, axis=1)[:, :kk]
        else:
            top_QxK = np.broadcast_to(np.arange(kk), (len(q), kk))
        part = (top_QxK + start, np.take_along_axis(scores_QxB, top_QxK, axis=1))
        best = part if best is None else merge_topk([best, part], min(k, best[0].shape[1] + kk))
    return merge_topk([best], k)


def write_meta(directory: str, meta: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, META_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(path + ".tmp", path)


def read_meta(directory: str, kind: str | None = None) -> dict:
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} holds no saved index ({META_FILE} missing)")
    with open(path) as f:
        meta = json.load(f)
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{directory} holds a {meta.get('kind')!r} index, not {kind!r}")
    return meta


def check_delete_rows(size: int, rows) -> np.ndarray:
    """``rows`` to delete as int64 in descending order; refuses a repeat, a row outside 0..size-1,
    or deleting every row (an index keeps at least one)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(np.unique(rows)) != len(rows):
        raise ValueError("rows to delete must not repeat")
    if len(rows) and not (0 <= rows.min() and rows.max() < size):
        raise ValueError(f"rows to delete must be in 0..{size - 1}, got {rows.min()}..{rows.max()}")
    if len(rows) >= size:
        raise ValueError(f"cannot delete all {size} rows: an index keeps at least one (build a new one)")
    return np.sort(rows)[::-1]


def delete_layout(size: int, rows) -> np.ndarray:
    """The layout after deleting ``rows`` from ``size`` rows as the indexes do (ScaNN's own order):
    ``source [size - len(rows)]`` int64, the old row now at each row. Rows go from the highest down,
    each taking the place of the current last row, so surviving rows below the new size keep their
    number and the survivors above it fill the holes below it."""
    source = np.arange(size, dtype=np.int64)
    n = size
    for row in check_delete_rows(size, rows).tolist():
        n -= 1
        source[row] = source[n]
    return source[:n]


def check_upsert(size: int, dim: int, rows, vectors) -> tuple[np.ndarray, np.ndarray, int]:
    """``(rows int64, vectors float32 [M, D], number of new rows)`` for ``upsert``: rows below ``size``
    are replaced, the others must be exactly ``size .. size + new - 1`` (in any order); no repeats,
    finite vectors of the index's dim."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.shape != (len(rows), dim):
        raise ValueError(f"{len(rows)} rows need vectors of shape {(len(rows), dim)}, got {vectors.shape}")
    if len(np.unique(rows)) != len(rows):
        raise ValueError("rows to upsert must not repeat")
    new = np.sort(rows[rows >= size])
    if (len(rows) and rows.min() < 0) or not np.array_equal(new, np.arange(size, size + len(new))):
        raise ValueError(f"rows must be existing rows (0..{size - 1}) or the next ones ({size}, {size + 1}, ...)")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors must be finite")
    return rows, vectors, len(new)
