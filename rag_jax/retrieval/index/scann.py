"""ScannIndex: approximate MIPS on the host with ScaNN (tree partitioning + asymmetric hashing +
exact reordering), the index RAG used for its 21M Wikipedia passages.

Defaults, chosen from N:

* N < ``BRUTE_FORCE_BELOW`` (20,000): ScaNN brute force (exact).
* else a tree of ``num_leaves = round(sqrt(N))`` leaves trained by spherical k-means (centroids
  normalised, rows and queries assigned to the centroid of largest inner product: what FAISS's IVF
  does for inner-product search), ``TRAINING_ITERATIONS`` (25) iterations on
  ``min(N, max(100_000, 500 * num_leaves))`` sampled rows; a query searches the fewest leaves
  (1, 2, 4, ...) that reach ``TARGET_RECALL`` (0.95) recall@10 against exact search on 500 sampled rows
  plus noise of half their spread, more reordering if all leaves are not enough (``tune_search``, at build time; the recall
  reached is in ``meta["recall"]``; a ``leaves_to_search`` given to ``build`` is kept and only measured,
  ``target_recall=None`` keeps ``ceil(LEAVES_FRACTION * num_leaves)``, 10%, at least
  ``MIN_LEAVES_TO_SEARCH``); AH scoring
  with 2 dims per block (16 centers each) and anisotropic quantization threshold 0.2; the best
  ``REORDER_FACTOR * k`` (100 for k = 10) AH candidates are rescored exactly in float32
  (``reorder_dtype="float32"``, the scores returned are exact inner products, 4 D bytes per row) or
  in int8 (``"int8"``: D bytes per row, scores approximate).

Why spherical: on clustered vectors with varying norms (``synthetic.py``, 250,000 x 768, 500
leaves, 1,000 queries; scratch measurement recorded in experiments/RESULTS.md), the share of the
true top 10 that lies in the leaves searched, at 1 / 2 / 5 / 10 / 25 leaves:

| norm log-std | tree | 1 | 2 | 5 | 10 | 25 |
|---|---|---|---|---|---|---|
| 0.25 | k-means on squared L2 (ScaNN's default) | 0.849 | 0.876 | 0.896 | 0.907 | 0.923 |
| 0.25 | spherical k-means (ours) | 0.977 | 0.979 | 0.981 | 0.982 | 0.985 |
| 0.25 | MIPS trick + spherical k-means | 0.745 | 0.871 | 0.929 | 0.946 | 0.959 |

(norm log-std 0.1: squared L2 0.844 at 1 leaf, spherical 0.978, trick + spherical 0.63; FAISS's
``IVF500`` spherical k-means 0.960.) At 1,000,000 x 768 (1,000 leaves) the sample and the iterations
matter: 1 leaf holds 0.82 of the top 10 after ScaNN's 12 iterations on 100,000 rows, 0.92 on 256,000
rows, 0.95 with 25 iterations on 256,000, 0.97 on all rows; the defaults above (500 rows per leaf,
25 iterations) gave 0.964 recall@10 end to end at 1 leaf (AH + int8 reordering).
The MIPS -> nearest-neighbour trick (Bachrach et al. 2014, as in
DPR's HNSW index: every row gets one more coordinate ``sqrt(M^2 - |x|^2)`` so all have norm M,
queries get a 0) stays available (``mips_trick=True``) but is off by default: the padded coordinate
is common to all rows and blurs the directions the partition needs. A smaller corpus needs a larger
share of its sqrt(N) leaves, and a fixed share suits one corpus, not every one (10% of the leaves gave
recall@10 0.906 on real MiniLM sentence embeddings): hence the tuning to a target recall at build time.
With real queries at hand, pass them as ``tuning_queries``.

Sharing: ScaNN's Python API trains a searcher on the rows it indexes (on a sample of
``training_sample_size`` of them) and has no call to reuse a trained tree for other rows, so each
shard of a ``ShardedIndex`` trains its own tree on a sample of its own rows.

Saved as ScaNN's own artifacts (``searcher.serialize`` with relative paths, so the folder can move)
plus ``index.json`` (dim, N, the trick's M, the search defaults).

Live updates (``upsert``, ``delete``; rows as ``base`` says) use ScaNN's own mutation on the searcher's
row numbers (no ScaNN doc ids, so nothing is pickled): a new or replaced vector is assigned to a leaf
of the trained tree and encoded with the trained AH codebooks, a deletion moves the last row into the
hole. Nothing is retrained: ``meta["updates"]`` counts the rows changed since the build, and the
search settings stay those tuned at the build. ScaNN 1.4 stores an upserted vector normalised in the
float32 reordering data of a spherical tree (it tags that data unit-norm), which would rescore it as
``q . x / |x|``; ``upsert`` writes the vectors back through a serialise-patch-load of the searcher
(I/O the size of the index, once per call). int8 reordering and non-spherical trees are not affected.
Recall after updating 10% of 200,000 rows against a fresh build: experiments/bench/index_updates.py.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from typing import Sized

import numpy as np
import scann
from scann.scann_ops.py.scann_builder import ReorderType

from rag_jax.errors import InputFileError
from rag_jax.retrieval.index.base import (
    check_build_inputs,
    check_delete_rows,
    check_queries,
    check_upsert,
    delete_layout,
    exact_search_numpy,
    merge_topk,
    read_meta,
    write_meta,
)

log = logging.getLogger(__name__)

BRUTE_FORCE_BELOW = 20_000
LEAVES_FRACTION = 0.1
MIN_LEAVES_TO_SEARCH = 8
REORDER_FACTOR = 10
TRAINING_ROWS_PER_LEAF = 500
TRAINING_ITERATIONS = 25
DOCIDS_PICKLE = "scann_docids.pkl"  # what scann's load_searcher unpickles when present
DEFAULT_K = 10  # the k the searcher is configured for; search() passes its own
ROW_BLOCK = 65536
REORDER_DTYPES = {"float32": ReorderType.FLOAT32, "int8": ReorderType.INT8}
TARGET_RECALL = 0.95  # recall@TUNING_K against exact search that build() tunes the search settings to
TUNING_K = 10
TUNING_QUERIES = 500
TUNING_NOISE = 0.5  # perturbed_rows: the tuning queries' noise, in units of the rows' per-dimension spread
MAX_REORDER_FACTOR = 100


def _squared_norms(embeddings, n: int) -> np.ndarray:
    out = np.empty(n, np.float64)
    for start in range(0, n, ROW_BLOCK):
        block = np.asarray(embeddings[start : start + ROW_BLOCK], dtype=np.float32)
        out[start : start + len(block)] = np.einsum("nd,nd->n", block, block, dtype=np.float64)
    return out


def _database(embeddings, n: int, dim: int, sq_norms: np.ndarray | None) -> tuple[np.ndarray, float]:
    """A float32 copy of the corpus for ScaNN, copied in row blocks; with ``sq_norms`` (the MIPS
    trick) one more coordinate ``sqrt(M^2 - |x|^2)``. Returns it and M (0 without the trick)."""
    out = np.empty((n, dim + (sq_norms is not None)), np.float32)
    for start in range(0, n, ROW_BLOCK):
        block = np.asarray(embeddings[start : start + ROW_BLOCK], dtype=np.float32)
        out[start : start + len(block), :dim] = block
    if sq_norms is None:
        return out, 0.0
    max_sq = float(sq_norms.max())
    out[:, dim] = np.sqrt(np.maximum(max_sq - sq_norms, 0.0))
    return out, math.sqrt(max_sq)


def perturbed_rows(embeddings, count: int, seed: int = 0, noise: float = TUNING_NOISE) -> np.ndarray:
    """``count`` rows sampled from ``embeddings`` plus Gaussian noise of ``noise`` times the rows' own
    per-dimension standard deviation: stand-in queries near the data but not on it (the default tuning
    queries). Noise as large as the data's spread (1.0) makes queries far from every row, harder than
    real questions: on clustered 200,000 x 768 vectors tuning then chose 128 of 447 leaves (1,754
    queries/s) where question-like queries need 1 (0.999 recall@10, 19,000 queries/s); 0.5 chose 1
    there, and on low-rank data still tunes to 0.988 on fresh queries (experiments/RESULTS.md)."""
    n = len(embeddings)
    rng = np.random.default_rng(seed)

    def sampled(size: int) -> np.ndarray:  # row by row: embeddings may be memory-mapped shards
        return np.stack([np.asarray(embeddings[int(i)], np.float32) for i in np.sort(rng.choice(n, min(size, n), False))])

    rows = sampled(count)
    spread = sampled(10_000).std(axis=0)
    return rows + rng.standard_normal(rows.shape).astype(np.float32) * (noise * spread)


def tune_search(index: "ScannIndex", embeddings, queries: np.ndarray, target_recall: float | None) -> dict:
    """Set ``index``'s search defaults to the fewest leaves (1, 2, 4, ..., all) reaching ``target_recall``
    at recall@``TUNING_K`` against exact search on ``queries`` (each leaf count with the built reorder
    factor, and at all leaves with up to ``MAX_REORDER_FACTOR``), or only measure the current settings
    (``target_recall`` None). Returns what is recorded in the metadata: the target, the recall reached, the
    settings and the query count."""
    k = min(TUNING_K, index.size)
    exact_ids, _ = exact_search_numpy(embeddings, queries, k)
    meta = index.meta
    if target_recall is not None:
        if not 0 < target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        leaves = sorted({min(2**i, meta["num_leaves"]) for i in range(meta["num_leaves"].bit_length() + 1)})
        settings = [(n, meta["reorder_factor"]) for n in leaves]
        factor = meta["reorder_factor"]
        while factor < MAX_REORDER_FACTOR:
            factor = min(2 * factor, MAX_REORDER_FACTOR)
            settings.append((meta["num_leaves"], factor))
        for n_leaves, factor in settings:
            meta["leaves_to_search"], meta["reorder_factor"] = n_leaves, factor
            if index.recall(queries, exact_ids) >= target_recall:
                break
    reached = index.recall(queries, exact_ids)
    if target_recall is not None and reached < target_recall:
        log.warning("ScaNN: recall@%d %.3f on the tuning queries is below the target %.3f even searching all %d "
                    "leaves with reordering x%d; build with more leaves, dims_per_block=1 or an exact index",
                    k, reached, target_recall, meta["num_leaves"], meta["reorder_factor"])  # fmt: skip
    return {"target": target_recall, f"recall_at_{k}": reached, "leaves_to_search": meta["leaves_to_search"],
            "reorder_factor": meta["reorder_factor"], "queries": len(queries)}  # fmt: skip


def _trick_queries(queries: np.ndarray) -> np.ndarray:
    """Queries for a MIPS-trick database: a zero in the extra coordinate, so inner products are unchanged."""
    return np.concatenate([queries, np.zeros((len(queries), 1), np.float32)], axis=1)


class ScannIndex:
    """ScaNN searcher plus what our interface needs (see the module docstring)."""

    def __init__(self, searcher, meta: dict, num_threads: int = 0):
        self.searcher, self.meta, self.num_threads = searcher, meta, num_threads
        self.dim, self.size = meta["dim"], meta["size"]

    @classmethod
    def build(
        cls,
        embeddings,
        *,
        num_leaves: int | None = None,
        leaves_to_search: int | None = None,
        leaves_fraction: float = LEAVES_FRACTION,
        reorder_factor: int = REORDER_FACTOR,
        mips_trick: bool = False,
        spherical: bool = True,
        reorder_dtype: str = "float32",
        brute_force_below: int = BRUTE_FORCE_BELOW,
        training_sample_size: int | None = None,
        training_iterations: int = TRAINING_ITERATIONS,
        dims_per_block: int = 2,
        anisotropic_quantization_threshold: float = 0.2,
        num_threads: int = 0,
        passages: Sized | None = None,
        target_recall: float | None = TARGET_RECALL,
        tuning_queries: np.ndarray | None = None,
        seed: int = 0,
    ) -> "ScannIndex":
        """Build a searcher over ``embeddings`` [N, D]; every argument has a default from N (see
        the module docstring).

        Search settings tuned to ``target_recall`` (recall@``TUNING_K`` against exact search, on
        ``tuning_queries`` or, by default, ``TUNING_QUERIES`` sampled rows perturbed by noise as large as
        the rows' spread; ``tune_search``) unless ``leaves_to_search`` is given or ``target_recall`` is
        None; the recall reached is measured either way and kept in ``meta["recall"]``."""
        n, dim = check_build_inputs(embeddings, passages)
        if reorder_dtype not in REORDER_DTYPES:
            raise ValueError(f"reorder_dtype must be one of {sorted(REORDER_DTYPES)}, got {reorder_dtype!r}")
        explicit_leaves = leaves_to_search
        tree = n >= brute_force_below
        mips_trick = tree and mips_trick
        db, max_norm = _database(embeddings, n, dim, _squared_norms(embeddings, n) if mips_trick else None)
        builder = scann.scann_ops_pybind.builder(db, DEFAULT_K, "dot_product")
        if tree:
            num_leaves = num_leaves or max(1, round(math.sqrt(n)))
            leaves_to_search = leaves_to_search or min(num_leaves, max(MIN_LEAVES_TO_SEARCH, math.ceil(leaves_fraction * num_leaves)))
            sample = training_sample_size or min(n, max(100_000, TRAINING_ROWS_PER_LEAF * num_leaves))
            builder = (
                builder.tree(
                    num_leaves=num_leaves, num_leaves_to_search=leaves_to_search, training_sample_size=sample,
                    training_iterations=training_iterations, spherical=spherical,
                )
                .score_ah(dims_per_block, anisotropic_quantization_threshold=anisotropic_quantization_threshold, training_sample_size=sample)
                .reorder(reorder_factor * DEFAULT_K, quantize=REORDER_DTYPES[reorder_dtype])
            )
        else:
            num_leaves = leaves_to_search = 0
            builder = builder.score_brute_force()
        if num_threads:
            builder = builder.set_n_training_threads(num_threads)
        searcher = builder.build()
        del db
        if num_threads:
            searcher.set_num_threads(num_threads)
        meta = {
            "kind": "scann", "size": n, "dim": dim, "mips_trick": mips_trick, "max_norm": max_norm, "spherical": tree and spherical,
            "reorder_dtype": reorder_dtype if tree else "float32", "tree": tree, "num_leaves": num_leaves, "leaves_to_search": leaves_to_search, "reorder_factor": reorder_factor,
        }
        index = cls(searcher, meta, num_threads)
        if tree:
            queries = tuning_queries if tuning_queries is not None else perturbed_rows(embeddings, TUNING_QUERIES, seed)
            tune = target_recall is not None and explicit_leaves is None
            index.meta["recall"] = tune_search(index, embeddings, queries, target_recall if tune else None)
        return index

    def recall(self, queries: np.ndarray, exact_ids: np.ndarray, **search_kwargs) -> float:
        """Mean recall@k of ``search`` against the exact top-k ``exact_ids`` [Q, k] of ``queries``."""
        ids, _ = self.search(queries, exact_ids.shape[1], **search_kwargs)
        return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), exact_ids.tolist())]))

    def search(
        self, queries: np.ndarray, k: int, *, leaves_to_search: int | None = None, reorder_factor: int | None = None,
        batch_size: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product (multithreaded over query batches: by default batches of up to 256,
        small enough that a training step's questions spread over every thread); ``leaves_to_search``
        and ``reorder_factor`` override the built defaults."""
        q = check_queries(queries, self.dim, self.size, k)
        if batch_size is None:
            batch_size = min(256, max(16, -(-len(q) // (self.num_threads or os.cpu_count() or 1))))
        if self.meta["mips_trick"]:
            q = _trick_queries(q)
        if len(q) == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        reorder = (reorder_factor or self.meta["reorder_factor"]) * k
        ids, scores = self.searcher.search_batched_parallel(
            q,
            final_num_neighbors=k,
            pre_reorder_num_neighbors=max(k, reorder) if self.meta["tree"] else None,
            leaves_to_search=(leaves_to_search or self.meta["leaves_to_search"]) if self.meta["tree"] else None,
            batch_size=batch_size,
        )
        ids, scores = np.asarray(ids, np.int64), np.asarray(scores, np.float32)
        if ids.shape != (len(q), k):
            raise RuntimeError(f"ScaNN returned {ids.shape[1]} neighbours for k={k}: search more leaves")
        return merge_topk([(ids, scores)], k)  # canonical tie order

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.searcher.serialize(directory, relative_path=True)
        write_meta(directory, self.meta)

    @classmethod
    def load(cls, directory: str, *, num_threads: int = 0) -> "ScannIndex":
        meta = read_meta(directory, "scann")
        docids = os.path.join(directory, DOCIDS_PICKLE)
        if os.path.exists(docids):  # ScaNN's loader would unpickle it; save() never writes one
            raise InputFileError("refusing to load a pickle (rag_jax's ScaNN indexes have no doc ids file)", where=docids)
        searcher = scann.scann_ops_pybind.load_searcher(directory, assets_backcompat_shim=False)
        if num_threads:
            searcher.set_num_threads(num_threads)
        return cls(searcher, meta, num_threads)

    # -- live updates (``base``: the row layout) ------------------------------------------------------

    def upsert(self, rows, vectors, *, batch_size: int = 256) -> None:
        """Replace rows below ``size`` and append rows ``size, size + 1, ...`` with ``vectors`` [M, D]
        (``base.check_upsert``), through ScaNN's own mutation: each vector goes to its leaf of the trained
        tree and is encoded with the trained AH codebooks; neither is retrained (``meta["updates"]``
        counts the rows changed since the build). With a spherical tree and float32 reordering the
        vectors are then written back into the reordering data (``_restore_reordering_rows``)."""
        rows, vectors, added = check_upsert(self.size, self.dim, rows, vectors)
        if not len(rows):
            return
        order = np.argsort(rows, kind="stable")  # replaced rows, then the new ones in the order ScaNN appends them
        rows, db = rows[order], self._database_rows(vectors[order])
        done = self.searcher.searcher.upsert([int(r) if r < self.size else None for r in rows.tolist()], db, batch_size)
        if list(done) != rows.tolist():
            raise RuntimeError(f"ScaNN upserted at rows {list(done)[:5]}..., expected {rows[:5].tolist()}...")
        if self.meta["spherical"] and self.meta["reorder_dtype"] == "float32":
            self._restore_reordering_rows(rows, db)
        self._resized(self.size + added, replaced=len(rows) - added, added=added)

    def delete(self, rows) -> np.ndarray:
        """Remove ``rows`` (ScaNN's own deletion: the last row takes each deleted row's place, from the
        highest row down); returns ``source``, the old row now at each row (``base.delete_layout``)."""
        source = delete_layout(self.size, rows)
        descending = check_delete_rows(self.size, rows)
        if len(descending):
            self.searcher.searcher.delete(descending.tolist())  # one by one, in this order
            self._resized(len(source), deleted=len(descending))
        return source

    def _resized(self, size: int, **counts: int) -> None:
        if self.searcher.size() != size:
            raise RuntimeError(f"ScaNN holds {self.searcher.size()} rows after the update, expected {size}")
        updates = self.meta.setdefault("updates", {"built_size": self.size, "replaced": 0, "added": 0, "deleted": 0})
        for name, count in counts.items():
            updates[name] += count
        self.size = self.meta["size"] = size

    def _database_rows(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as the searcher stores them: with the MIPS trick one more coordinate
        ``sqrt(max(M^2 - |x|^2, 0))`` (a row longer than the build's longest, M, gets 0: its inner
        products stay exact, its leaf may be a worse fit)."""
        if not self.meta["mips_trick"]:
            return np.ascontiguousarray(vectors, np.float32)
        extra = np.sqrt(np.maximum(self.meta["max_norm"] ** 2 - np.einsum("nd,nd->n", vectors, vectors), 0.0))
        return np.concatenate([vectors, extra[:, None].astype(np.float32)], axis=1)

    def _restore_reordering_rows(self, rows: np.ndarray, db: np.ndarray) -> None:
        """ScaNN 1.4 tags the float32 reordering data of a spherical tree as unit-norm, so an upserted
        vector is stored normalised there and would be rescored as ``q . x / |x|`` (its leaf and AH
        code are right). Writes the vectors back: the searcher is serialised to a temporary folder
        (``TMPDIR``), the rows of ``dataset.npy`` are set, and it is loaded again: I/O the size of the
        index, once per ``upsert`` call (so pass all the rows in one call)."""
        with tempfile.TemporaryDirectory(prefix="rag-jax-scann-") as tmp:
            self.searcher.serialize(tmp, relative_path=True)
            data = np.load(os.path.join(tmp, "dataset.npy"), mmap_mode="r+")
            data[rows] = db
            data.flush()
            del data
            self.searcher = scann.scann_ops_pybind.load_searcher(tmp, assets_backcompat_shim=False)
        if self.num_threads:
            self.searcher.set_num_threads(self.num_threads)
