"""ExactIndex: brute-force maximum inner product search on the accelerators.

The corpus matrix lives on a 1-D device mesh (axis ``corpus``), rows split evenly over the
devices and padded with zero rows to ``devices x rows_per_device``, ``rows_per_device`` a multiple of
the chunk size. A search runs, under ``jax.shard_map``, on every device at once: a scan over the
device's chunks scores ``[Q, chunk]`` (float32 accumulation), keeps the chunk's top-k
(``lax.top_k``) and merges it into a running ``[Q, k]``; the per-device results are then merged into
the global top-k. Padding rows score -inf. The full ``[Q, N]`` score matrix never exists, and
memory per device is the shard of the corpus plus ``Q x chunk`` scores.

Storage is float32 (scores exact to float32 matmul rounding, computed at HIGHEST precision so GPUs
do not use TF32) or bfloat16 (half the memory; queries are rounded to bfloat16 too, products are
accumulated in float32). Ties are ordered by ascending row: ``lax.top_k`` keeps the lower index
first and every merge concatenates candidates in row order. On TPU, ``tpu_approx_recall`` opts in to
``lax.approx_max_k`` for the per-chunk selection (then the result is approximate); elsewhere it is
ignored.

Memory for 21M x 768: 64 GiB in float32, 32 GiB in bfloat16, spread over the mesh.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Sequence, Sized

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rag_jax.retrieval.index.base import check_build_inputs, check_queries, read_meta, write_meta

AXIS = "corpus"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
EMBEDDINGS_FILE = "embeddings.npy"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def corpus_layout(n: int, num_devices: int, chunk_size: int) -> tuple[int, int]:
    """``(chunk, rows_per_device)``: as few chunks of at most ``chunk_size`` rows (a multiple of 8)
    as cover a device's share, so padding stays under 8 rows per chunk."""
    per_device = -(-n // num_devices)
    num_chunks = -(-per_device // chunk_size)
    chunk = _round_up(-(-per_device // num_chunks), 8)
    return chunk, chunk * num_chunks


def _local_topk(q_QxD, emb_RxD, *, k: int, chunk: int, n_valid: int, approx_recall: float | None):
    """One device's top-k over its rows: ``([1, Q, k] scores, [1, Q, k] global rows)``."""
    rows_per_device, dim = emb_RxD.shape
    first_row = lax.axis_index(AXIS) * rows_per_device
    chunks_GxCxD = emb_RxD.reshape(rows_per_device // chunk, chunk, dim)
    q_QxD = q_QxD.astype(emb_RxD.dtype)
    kk = min(k, chunk)

    def step(best, xs):
        best_s_QxK, best_i_QxK = best
        g, emb_CxD = xs
        s_QxC = jnp.einsum("qd,cd->qc", q_QxD, emb_CxD, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
        rows_C = first_row + g * chunk + jnp.arange(chunk, dtype=jnp.int32)
        s_QxC = jnp.where(rows_C[None, :] < n_valid, s_QxC, -jnp.inf)
        if approx_recall is None:
            top_s, top_j = lax.top_k(s_QxC, kk)
        else:
            top_s, top_j = lax.approx_max_k(s_QxC, kk, recall_target=approx_recall)
        cand_s = jnp.concatenate([best_s_QxK, top_s], axis=1)  # earlier rows first: ties keep row order
        cand_i = jnp.concatenate([best_i_QxK, rows_C[top_j]], axis=1)
        s, j = lax.top_k(cand_s, k)
        return (s, jnp.take_along_axis(cand_i, j, axis=1)), None

    num_queries = q_QxD.shape[0]
    init = (jnp.full((num_queries, k), -jnp.inf, jnp.float32), jnp.full((num_queries, k), -1, jnp.int32))
    init = lax.pcast(init, (AXIS,), to="varying")  # the carry differs per device
    (s_QxK, i_QxK), _ = lax.scan(step, init, (jnp.arange(chunks_GxCxD.shape[0]), chunks_GxCxD))
    return s_QxK[None], i_QxK[None]


@functools.lru_cache(maxsize=64)
def search_program(mesh: Mesh, k: int, chunk: int, n_valid: int, approx_recall: float | None):
    """The jitted search ``(queries [Q, D], corpus [N_pad, D]) -> (scores [Q, k], rows [Q, k])``."""
    local = functools.partial(_local_topk, k=k, chunk=chunk, n_valid=n_valid, approx_recall=approx_recall)
    per_device = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS, None)), out_specs=(P(AXIS), P(AXIS)))

    @jax.jit
    def search(q_QxD, emb_NxD):
        s_GxQxK, i_GxQxK = per_device(q_QxD, emb_NxD)
        num_queries = q_QxD.shape[0]
        s_QxGK = jnp.moveaxis(s_GxQxK, 0, 1).reshape(num_queries, -1)  # device order = row order
        i_QxGK = jnp.moveaxis(i_GxQxK, 0, 1).reshape(num_queries, -1)
        s_QxK, j = lax.top_k(s_QxGK, k)
        return s_QxK, jnp.take_along_axis(i_QxGK, j, axis=1)

    return search


def abstract_search(size: int, dim: int, *, k: int, query_batch: int, dtype: str, devices: Sequence[jax.Device],
                    chunk_size: int = 32768):
    """``(search, queries, corpus)``: the jitted search of an index of ``size`` x ``dim`` rows over
    ``devices`` and its arguments as ``jax.ShapeDtypeStruct``s with their shardings, to compile ahead
    of time (``search.trace(queries, corpus).lower().compile()``) without the embeddings."""
    mesh = jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)
    chunk, rows_per_device = corpus_layout(size, len(devices), chunk_size)
    queries = jax.ShapeDtypeStruct((query_batch, dim), jnp.float32, sharding=NamedSharding(mesh, P()))
    corpus = jax.ShapeDtypeStruct((rows_per_device * len(devices), dim), jnp.dtype(DTYPES[dtype]),
                                  sharding=NamedSharding(mesh, P(AXIS, None)))  # fmt: skip
    return search_program(mesh, k, chunk, size, None), queries, corpus


class ExactIndex:
    """Exact MIPS over a corpus sharded across devices (see the module docstring)."""

    def __init__(self, emb_NxD: jax.Array, size: int, chunk: int, mesh: Mesh, dtype: str, chunk_size: int, tpu_approx_recall: float | None):
        self.emb_NxD, self.size, self.dim = emb_NxD, size, emb_NxD.shape[1]
        self.chunk, self.mesh, self.dtype, self.chunk_size = chunk, mesh, dtype, chunk_size
        on_tpu = mesh.devices.flat[0].platform == "tpu"
        self.approx_recall = tpu_approx_recall if on_tpu else None
        self.tpu_approx_recall = tpu_approx_recall

    @classmethod
    def build(
        cls,
        embeddings,
        *,
        dtype: str = "float32",
        devices: Sequence[jax.Device] | None = None,
        chunk_size: int = 32768,
        tpu_approx_recall: float | None = None,
        passages: Sized | None = None,
    ) -> "ExactIndex":
        """Copy ``embeddings`` [N, D] (any array-like with row slices, e.g. memory-mapped shards)
        to ``devices`` (default: all), each device reading only its rows."""
        n, dim = check_build_inputs(embeddings, passages)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        devices = list(devices if devices is not None else jax.devices())
        mesh = jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)
        chunk, rows_per_device = corpus_layout(n, len(devices), chunk_size)
        storage = DTYPES[dtype]

        def rows(index):
            start, stop, _ = index[0].indices(rows_per_device * len(devices))
            block = np.zeros((stop - start, dim), storage)
            real = np.asarray(embeddings[start : min(stop, n)])
            block[: len(real)] = real
            return block

        emb = jax.make_array_from_callback((rows_per_device * len(devices), dim), NamedSharding(mesh, P(AXIS, None)), rows)
        return cls(emb, n, chunk, mesh, dtype, chunk_size, tpu_approx_recall)

    def search(self, queries: np.ndarray, k: int, *, query_batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product: ``(ids [Q, k] int64, scores [Q, k] float32)``. Queries go in
        blocks of a power of two up to ``query_batch`` (few compiled shapes)."""
        q = check_queries(queries, self.dim, self.size, k)
        program = search_program(self.mesh, k, self.chunk, self.size, self.approx_recall)
        block = min(query_batch, 1 << max(3, math.ceil(math.log2(max(len(q), 1)))))
        ids, scores = [], []
        replicated = NamedSharding(self.mesh, P())
        for start in range(0, len(q), block):
            part = q[start : start + block]
            padded = np.zeros((block, self.dim), np.float32)
            padded[: len(part)] = part
            s, i = program(jax.device_put(padded, replicated), self.emb_NxD)
            scores.append(np.asarray(s)[: len(part)])
            ids.append(np.asarray(i)[: len(part)].astype(np.int64))
        if not ids:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return np.concatenate(ids), np.concatenate(scores)

    def save(self, directory: str) -> None:
        """The embeddings (without padding; bfloat16 as uint16 bits) and ``index.json``; each
        device's rows are written straight into the file."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, EMBEDDINGS_FILE)
        bits = self.dtype == "bfloat16"  # NumPy has no bfloat16: saved as uint16 bits
        out = np.lib.format.open_memmap(path + ".tmp.npy", mode="w+", dtype=np.uint16 if bits else np.float32, shape=(self.size, self.dim))
        for shard in self.emb_NxD.addressable_shards:
            start, stop, _ = shard.index[0].indices(self.emb_NxD.shape[0])
            stop = min(stop, self.size)
            if start < stop:
                block = np.asarray(shard.data)[: stop - start]
                out[start:stop] = block.view(np.uint16) if bits else block
        out.flush()
        del out
        os.replace(path + ".tmp.npy", path)
        write_meta(directory, {"kind": "exact", "size": self.size, "dim": self.dim, "dtype": self.dtype,
                               "chunk_size": self.chunk_size, "tpu_approx_recall": self.tpu_approx_recall})

    @classmethod
    def load(cls, directory: str, *, devices: Sequence[jax.Device] | None = None) -> "ExactIndex":
        meta = read_meta(directory, "exact")
        emb = np.load(os.path.join(directory, EMBEDDINGS_FILE), mmap_mode="r")
        if meta["dtype"] == "bfloat16":
            emb = emb.view(ml_dtypes.bfloat16)
        if emb.shape != (meta["size"], meta["dim"]):
            raise ValueError(f"{directory}: embeddings have shape {emb.shape}, index.json says {(meta['size'], meta['dim'])}")
        return cls.build(emb, dtype=meta["dtype"], devices=devices, chunk_size=meta["chunk_size"], tpu_approx_recall=meta["tpu_approx_recall"])
