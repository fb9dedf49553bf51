"""ExactIndex: brute-force maximum inner product search on the accelerators.

The corpus matrix lives on a device mesh, by default 1-D (axis ``corpus``) over the devices given,
or any mesh with the rows split over all of its axes (``build(mesh=)``: the training mesh
for retrieval inside the step, ``rag_jax.retrieval.device``); rows split evenly over the
devices (in the mesh's device order) and padded with zero rows to ``devices x rows_per_device``, ``rows_per_device`` a multiple of
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

Live updates (``upsert``, ``delete``; the row layout is ``base``'s) run on the devices: each device
writes the rows it holds (``row_programs``: no device gathers the corpus); a deletion copies the few
rows above the new size into the holes and lowers the valid-row count searches mask with. Appending past
the padded capacity re-lays the rows out for the new size first (for a moment the old and the new
array are both held).
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

from rag_jax.retrieval.index.base import (
    check_build_inputs,
    check_queries,
    check_upsert,
    delete_layout,
    read_meta,
    write_meta,
)
from rag_jax.retrieval.index.collective import gather_queries

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


def _compiled_size(n: int) -> int:
    """The power of two (at least 8) that ``n`` rows are padded to: few compiled shapes."""
    return 1 << max(3, math.ceil(math.log2(max(n, 1))))


def local_topk(q_QxD, emb_RxD, *, k: int, chunk: int, n_valid: int, approx_recall: float | None,
               axes: tuple[str, ...] = (AXIS,)):  # fmt: skip
    """One device's top-k over its rows, inside ``shard_map`` with the rows split over ``axes``:
    ``([1, Q, k] scores, [1, Q, k] global rows)``."""
    rows_per_device, dim = emb_RxD.shape
    first_row = lax.axis_index(axes) * rows_per_device
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
    init = lax.pcast(init, axes, to="varying")  # the carry differs per device
    (s_QxK, i_QxK), _ = lax.scan(step, init, (jnp.arange(chunks_GxCxD.shape[0]), chunks_GxCxD))
    return s_QxK[None], i_QxK[None]


@functools.lru_cache(maxsize=64)
def search_program(mesh: Mesh, k: int, chunk: int, n_valid: int, approx_recall: float | None,
                   axes: tuple[str, ...] = (AXIS,)):  # fmt: skip
    """The jitted search ``(queries [Q, D], corpus [N_pad, D]) -> (scores [Q, k], rows [Q, k])``."""
    local = functools.partial(local_topk, k=k, chunk=chunk, n_valid=n_valid, approx_recall=approx_recall, axes=axes)
    per_device = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes, None)), out_specs=(P(axes), P(axes)))

    @jax.jit
    def search(q_QxD, emb_NxD):
        return merge_device_topk(*per_device(q_QxD, emb_NxD), k)

    return search


def merge_device_topk(s_GxQxK, i_GxQxK, k: int):
    """The global top-k ``([Q, k] scores, [Q, k] rows)`` of every device's ``[Q, k]`` candidates, stacked in
    device order (= row order, so ties go to the lower row)."""
    num_queries = s_GxQxK.shape[1]
    s_QxGK = jnp.moveaxis(s_GxQxK, 0, 1).reshape(num_queries, -1)
    i_QxGK = jnp.moveaxis(i_GxQxK, 0, 1).reshape(num_queries, -1)
    s_QxK, j = lax.top_k(s_QxGK, k)
    return s_QxK, jnp.take_along_axis(i_QxGK, j, axis=1)


def held_rows(x_RxF, rows_M, axes: tuple[str, ...], dtype=None):
    """Inside ``shard_map`` with the rows split over ``axes``: ``x``'s rows at the global ``rows_M`` [M],
    each read on the device that holds it (in ``dtype``), the others adding zeros, summed over the devices
    (replicated); row -1 (none) gives zeros. No device gathers the corpus."""
    held = x_RxF.shape[0]
    local_M = rows_M - lax.axis_index(axes) * held
    mine_M = (rows_M >= 0) & (local_M >= 0) & (local_M < held)
    values = x_RxF[jnp.clip(local_M, 0, held - 1)]
    values = values if dtype is None else values.astype(dtype)
    mine = mine_M.reshape(*mine_M.shape, *[1] * (values.ndim - 1))
    return lax.psum(jnp.where(mine, values, jnp.zeros_like(values)), axes)


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

    def __init__(self, emb_NxD: jax.Array, size: int, chunk: int, mesh: Mesh, dtype: str, chunk_size: int,
                 tpu_approx_recall: float | None, axes: tuple[str, ...] = (AXIS,)):  # fmt: skip
        self.emb_NxD, self.size, self.dim = emb_NxD, size, emb_NxD.shape[1]
        self.chunk, self.mesh, self.dtype, self.chunk_size, self.axes = chunk, mesh, dtype, chunk_size, tuple(axes)
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
        mesh: Mesh | None = None,
    ) -> "ExactIndex":
        """Copy ``embeddings`` [N, D] (any array-like with row slices, e.g. memory-mapped shards)
        to ``devices`` (default: all), each device reading only its rows; or to ``mesh``, the rows
        split over all of its axes (in its device order), e.g. a training mesh."""
        n, dim = check_build_inputs(embeddings, passages)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if mesh is None:
            devices = list(devices if devices is not None else jax.devices())
            mesh = jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)
        axes = tuple(mesh.axis_names)
        devices = list(mesh.devices.flat)
        chunk, rows_per_device = corpus_layout(n, len(devices), chunk_size)
        storage = DTYPES[dtype]

        def rows(index):
            start, stop, _ = index[0].indices(rows_per_device * len(devices))
            block = np.zeros((stop - start, dim), storage)
            real = np.asarray(embeddings[start : min(stop, n)])
            block[: len(real)] = real
            return block

        emb = jax.make_array_from_callback((rows_per_device * len(devices), dim), NamedSharding(mesh, P(axes, None)), rows)
        return cls(emb, n, chunk, mesh, dtype, chunk_size, tpu_approx_recall, axes)

    def search(self, queries: np.ndarray, k: int, *, query_batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product: ``(ids [Q, k] int64, scores [Q, k] float32)``. Queries go in
        blocks of a power of two up to ``query_batch`` (few compiled shapes)."""
        q = check_queries(queries, self.dim, self.size, k)
        own = slice(None)
        if not self.emb_NxD.is_fully_addressable:  # a mesh over several processes: every process's queries at once
            q, own = gather_queries(q)
        program = search_program(self.mesh, k, self.chunk, self.size, self.approx_recall, self.axes)
        block = min(query_batch, _compiled_size(len(q)))
        ids, scores = [], []
        replicated = NamedSharding(self.mesh, P())
        for start in range(0, len(q), block):
            part = q[start : start + block]
            padded = np.zeros((block, self.dim), np.float32)
            padded[: len(part)] = part
            s, i = program(jax.make_array_from_callback(padded.shape, replicated, lambda at: padded[at]), self.emb_NxD)
            scores.append(np.asarray(s.addressable_data(0))[: len(part)])
            ids.append(np.asarray(i.addressable_data(0))[: len(part)].astype(np.int64))
        if not ids:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return np.concatenate(ids)[own], np.concatenate(scores)[own]

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

    # -- live updates (``base``: the row layout) ------------------------------------------------------

    def upsert(self, rows, vectors, *, block: int = 65536) -> None:
        """Replace rows below ``size`` and append rows ``size, size + 1, ...`` with ``vectors`` [M, D]
        (``base.check_upsert``), written on the devices that hold them, ``block`` rows at a time."""
        rows, vectors, added = check_upsert(self.size, self.dim, rows, vectors)
        if not len(rows):
            return
        if self.size + added > self.emb_NxD.shape[0]:
            self._grow(self.size + added)
        self._set_rows(rows, vectors, block)
        self.size += added

    def delete(self, rows, *, block: int = 65536) -> np.ndarray:
        """Remove ``rows``: the rows above the new size that survive are copied into the holes below it
        (``base.delete_layout``, which the returned ``source``, the old row now at each row, is)."""
        source = delete_layout(self.size, rows)
        holes = np.flatnonzero(source != np.arange(len(source)))
        for start in range(0, len(holes), block):
            part = holes[start : start + block]
            self._set_rows(part, self._get_rows(source[part]), block)
        self.size = len(source)
        return source

    def _padded(self, rows: np.ndarray) -> np.ndarray:
        """Rows padded to a power of two with -1 (no row): few compiled shapes."""
        out = np.full(_compiled_size(len(rows)), -1, np.int32)
        out[: len(rows)] = rows
        return out

    def _set_rows(self, rows: np.ndarray, vectors: np.ndarray, block: int) -> None:
        set_rows, _ = row_programs(self.mesh, self.axes)
        replicated = NamedSharding(self.mesh, P())
        for start in range(0, len(rows), block):
            part = self._padded(rows[start : start + block])
            values = np.zeros((len(part), self.dim), np.float32)
            values[: min(block, len(rows) - start)] = vectors[start : start + block]
            self.emb_NxD = set_rows(self.emb_NxD, jax.device_put(part, replicated), jax.device_put(values, replicated))

    def _get_rows(self, rows: np.ndarray) -> np.ndarray:
        _, get_rows = row_programs(self.mesh, self.axes)
        values = get_rows(self.emb_NxD, jax.device_put(self._padded(rows), NamedSharding(self.mesh, P())))
        return np.asarray(values)[: len(rows)]

    def _grow(self, size: int) -> None:
        """Re-lay the rows out on the devices for ``size`` rows (``corpus_layout``, as ``build`` would)."""
        chunk, rows_per_device = corpus_layout(size, self.mesh.devices.size, self.chunk_size)
        capacity = rows_per_device * self.mesh.devices.size
        sharding = NamedSharding(self.mesh, P(self.axes, None))
        grow = jax.jit(lambda e: jnp.pad(e, ((0, capacity - e.shape[0]), (0, 0))), out_shardings=sharding)
        self.emb_NxD, self.chunk = grow(self.emb_NxD), chunk


@functools.lru_cache(maxsize=16)
def row_programs(mesh: Mesh, axes: tuple[str, ...] = (AXIS,)):
    """``(set_rows, get_rows)`` for a corpus split over ``axes`` of ``mesh``: ``set_rows(corpus, rows [M],
    values [M, D]) -> corpus`` (donated; each device writes the rows it holds, row -1 is none) and
    ``get_rows(corpus, rows [M]) -> [M, D]`` float32, replicated (each device gives its rows, a ``psum``
    adds the zeros of the others)."""
    spec = P(axes, None)

    def set_local(emb_RxD, rows_M, values_MxD):
        held = emb_RxD.shape[0]
        local_M = rows_M - lax.axis_index(axes) * held
        local_M = jnp.where((rows_M >= 0) & (local_M >= 0), local_M, held)  # not held here (>= held too): dropped
        return emb_RxD.at[local_M].set(values_MxD.astype(emb_RxD.dtype), mode="drop")

    def get_local(emb_RxD, rows_M):
        return held_rows(emb_RxD, rows_M, axes, jnp.float32)

    set_rows = jax.jit(jax.shard_map(set_local, mesh=mesh, in_specs=(spec, P(), P()), out_specs=spec), donate_argnums=0)
    get_rows = jax.jit(jax.shard_map(get_local, mesh=mesh, in_specs=(spec, P()), out_specs=P()))
    return set_rows, get_rows
