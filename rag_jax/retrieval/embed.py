"""The embedding job: encode every passage of a store into row shards on disk, resumably.

Layout of ``out_dir``: ``embeddings-00000.npy, embeddings-00001.npy, ...`` (shard ``s`` holds rows
``s * shard_size`` to ``(s + 1) * shard_size - 1`` of the store, the last one shorter) and
``manifest.json`` (source fingerprint, counts, dim, dtype and the job's settings). Each shard is
written to a temporary name and renamed, so a shard file that exists is complete. A re-run skips
the shards that exist and, because batches always start at shard boundaries and every batch has the
same padded shape (one compiled program), writes bit-identical shards to an uninterrupted run. A
re-run with other settings (source file, batch or shard size, dtype, input mode, encoder name) is
refused rather than mixed with old shards.

Storage dtypes: float32, float16, or bfloat16. NumPy has no bfloat16; bfloat16 shards are saved
as their raw bits (uint16 ``.npy``) and ``load_embeddings`` views them as ``ml_dtypes.bfloat16``
(the type JAX uses), so ``np.load`` by hand gives uint16.

The encoder's input for a passage follows DPR's context encoder by default: the pair
``(title, text)``, i.e. ``[CLS] title [SEP] text [SEP]``. DPR feeds all-zero token types for it; an
``encode_fn(ids, mask)`` that sets token types to 0 matches that.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from typing import Callable, Sequence

import jax
import ml_dtypes
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from rag_jax.errors import InputFileError
from rag_jax.retrieval.corpus import Passage, PassageStore

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
INPUT_MODES = ("pair", "text", "concat")

# tokenize_fn(first, second) -> (ids [B, S], mask [B, S]) with one fixed S for every call.
TokenizeFn = Callable[[list[str], "list[str] | None"], tuple[np.ndarray, np.ndarray]]
# encode_fn(ids [B, S], mask [B, S]) -> [B, D], jitted.
EncodeFn = Callable[[jax.Array, jax.Array], jax.Array]


def passage_inputs(passages: Sequence[Passage], mode: str = "pair") -> tuple[list[str], list[str] | None]:
    """The encoder's text for each passage: ``"pair"`` (title, text) as DPR, ``"text"`` the text
    alone, ``"concat"`` one sequence ``title + " " + text``."""
    if mode == "pair":
        return [p.title for p in passages], [p.text for p in passages]
    if mode == "text":
        return [p.text for p in passages], None
    if mode == "concat":
        return [f"{p.title} {p.text}".strip() for p in passages], None
    raise ValueError(f"input mode must be one of {INPUT_MODES}, got {mode!r}")


def hf_tokenize_fn(tokenizer, max_length: int) -> TokenizeFn:
    """A ``tokenize_fn`` from a transformers tokenizer: padded to ``max_length``, truncated
    longest-first (DPR's setting for title/text pairs)."""

    def tokenize(first: list[str], second: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
        enc = tokenizer(first, second, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    return tokenize


def num_shards(num_passages: int, shard_size: int) -> int:
    """How many row shards of ``shard_size`` an embedding job over ``num_passages`` writes."""
    return math.ceil(num_passages / shard_size)


def shard_path(out_dir: str, shard: int) -> str:
    return os.path.join(out_dir, f"embeddings-{shard:05d}.npy")


def write_json_atomic(path: str, obj: dict) -> None:
    """Write ``obj`` to ``path`` through a temporary file of this writer's own (processes sharing a
    job write the same manifest; one shared temporary name would let them clobber each other's)."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _save_shard_atomic(path: str, array: np.ndarray) -> None:
    if array.dtype == ml_dtypes.bfloat16:
        array = array.view(np.uint16)
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _job_settings(store: PassageStore, batch_size: int, shard_size: int, dtype: str, input_mode: str, encoder_name: str) -> dict:
    fp = store.fingerprint
    return {
        "version": MANIFEST_VERSION,
        "source": {"size": fp["size"], "mtime_ns": fp["mtime_ns"], "num_passages": fp["num_passages"]},
        "num_passages": len(store),
        "batch_size": batch_size,
        "shard_size": shard_size,
        "num_shards": num_shards(len(store), shard_size),
        "dtype": dtype,
        "input_mode": input_mode,
        "encoder_name": encoder_name,
    }


def _check_or_start_manifest(out_dir: str, settings: dict) -> dict:
    """The manifest of ``out_dir``: a new one, or the existing one when its settings agree."""
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            manifest = json.load(f)
        changed = {k: (manifest.get(k), v) for k, v in settings.items() if manifest.get(k) != v}
        if changed:
            detail = "; ".join(f"{k}: {old!r} in the folder, {new!r} now" for k, (old, new) in changed.items())
            raise InputFileError(f"holds embeddings made with other settings ({detail}); use another folder or delete it",
                                 where=out_dir)  # fmt: skip
        return manifest
    os.makedirs(out_dir, exist_ok=True)
    manifest = {**settings, "dim": None, "complete": False}
    write_json_atomic(path, manifest)
    return manifest


class _BatchEncoder:
    """Runs ``encode_fn`` on fixed-shape batches, sharded over ``devices`` when there are several,
    one batch in flight while the host tokenizes the next."""

    def __init__(self, encode_fn: EncodeFn, tokenize_fn: TokenizeFn, batch_size: int, input_mode: str, devices):
        if batch_size % len(devices):
            raise ValueError(f"batch_size {batch_size} must be a multiple of the number of devices ({len(devices)})")
        self.encode_fn, self.tokenize_fn = encode_fn, tokenize_fn
        self.batch_size, self.input_mode = batch_size, input_mode
        if len(devices) > 1:
            mesh = jax.make_mesh((len(devices),), ("batch",), axis_types=(AxisType.Auto,), devices=devices)
            self.sharding = NamedSharding(mesh, P("batch"))
        else:
            self.sharding = devices[0]
        self.seq_len = None

    def _inputs(self, passages: list[Passage]) -> tuple[np.ndarray, np.ndarray]:
        ids_BxS, mask_BxS = (np.asarray(a) for a in self.tokenize_fn(*passage_inputs(passages, self.input_mode)))
        if ids_BxS.shape != mask_BxS.shape or ids_BxS.shape[0] != len(passages):
            raise ValueError(f"tokenize_fn returned ids {ids_BxS.shape} and mask {mask_BxS.shape} for {len(passages)} passages")
        if self.seq_len is None:
            self.seq_len = ids_BxS.shape[1]
        elif ids_BxS.shape[1] != self.seq_len:
            raise ValueError(
                f"tokenize_fn returned length {ids_BxS.shape[1]} after {self.seq_len}: pad every batch to one fixed length"
            )
        pad = ((0, self.batch_size - len(passages)), (0, 0))  # repeat the last row: a valid input
        return np.pad(ids_BxS, pad, mode="edge"), np.pad(mask_BxS, pad, mode="edge")

    def encode(self, batches, num_rows: int, dtype, on_rows: Callable[[int], object] = lambda n: None) -> np.ndarray:
        """Encode consecutive ``batches`` (``num_rows`` passages in all) into a [num_rows, D] array
        of ``dtype``; ``on_rows(n)`` is called as each batch's ``n`` rows arrive (progress)."""
        out, row, pending = None, 0, None
        for passages in batches:
            ids_BxS, mask_BxS = self._inputs(passages)
            emb_BxD = self.encode_fn(jax.device_put(ids_BxS, self.sharding), jax.device_put(mask_BxS, self.sharding))
            if pending is not None:  # fetch the previous batch while this one runs
                out, row = self._collect(pending, out, row, num_rows, dtype)
                on_rows(pending[1])
            pending = (emb_BxD, len(passages))
        if pending is not None:
            out, row = self._collect(pending, out, row, num_rows, dtype)
            on_rows(pending[1])
        if row != num_rows:
            raise RuntimeError(f"encoded {row} rows, expected {num_rows}")
        return out

    @staticmethod
    def _collect(pending, out, row, num_rows, dtype):
        emb_BxD, n = pending
        emb = np.asarray(emb_BxD)[:n]
        if emb.ndim != 2:
            raise ValueError(f"encode_fn must return [batch, dim], got shape {emb.shape}")
        if out is None:
            out = np.empty((num_rows, emb.shape[1]), dtype)
        out[row : row + n] = emb
        return out, row + n


def embed_passages(
    store: PassageStore,
    encode_fn: EncodeFn,
    tokenize_fn: TokenizeFn,
    out_dir: str,
    *,
    batch_size: int,
    shard_size: int,
    dtype: str = "float32",
    devices: Sequence[jax.Device] | None = None,
    progress: bool = True,
    input_mode: str = "pair",
    encoder_name: str = "",
    shards: Sequence[int] | None = None,
) -> dict:
    """Encode every passage of ``store`` into embedding shards in ``out_dir``; returns the manifest.

    ``encode_fn(ids, mask) -> [B, D]`` is a jitted encoder; ``tokenize_fn(first, second)`` gives
    ``(ids, mask)`` padded to one fixed length (``hf_tokenize_fn`` makes one); ``input_mode`` picks
    the text (``passage_inputs``). Every batch holds ``batch_size`` rows (the last one of a shard
    padded), split over ``devices`` (default: the local devices) on a 1-D mesh when there are
    several. ``encoder_name`` is recorded and checked on resume. ``shards`` restricts the job to
    some shard numbers, e.g. ``range(host, num_shards, num_hosts)`` to split it over hosts.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    passage_inputs([], input_mode)  # validates the mode
    settings = _job_settings(store, batch_size, shard_size, dtype, input_mode, encoder_name)
    manifest = _check_or_start_manifest(out_dir, settings)
    encoder = _BatchEncoder(encode_fn, tokenize_fn, batch_size, input_mode, list(devices or jax.local_devices()))
    todo = range(settings["num_shards"]) if shards is None else sorted(set(shards))

    def rows_of(s: int) -> tuple[int, int]:
        return s * shard_size, min((s + 1) * shard_size, len(store))

    dim = manifest["dim"]
    done = {s for s in todo if os.path.exists(shard_path(out_dir, s))}  # complete (written by rename)
    for s in done:
        start, stop = rows_of(s)
        shape = np.load(shard_path(out_dir, s), mmap_mode="r").shape
        if shape[0] != stop - start:
            raise ValueError(f"{shard_path(out_dir, s)} holds {shape[0]} rows, expected {stop - start}")
        dim = shape[1]
    total = sum(stop - start for start, stop in map(rows_of, todo))
    resumed = sum(stop - start for start, stop in map(rows_of, done))  # counted as done, not in the rate/ETA
    bar = tqdm(total=total, initial=resumed, unit=" passages", unit_scale=True, desc="embedding", disable=not progress,
               smoothing=0.1)  # fmt: skip
    for s in todo:
        if s in done:
            continue
        start, stop = rows_of(s)
        path = shard_path(out_dir, s)
        batches = store.iter_batches(batch_size, start, stop)
        out = encoder.encode(batches, stop - start, STORAGE_DTYPES[dtype], on_rows=bar.update)
        dim = out.shape[1]
        _save_shard_atomic(path, out)
    bar.close()

    complete = all(os.path.exists(shard_path(out_dir, s)) for s in range(settings["num_shards"]))
    manifest = {**settings, "dim": dim, "complete": complete}
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def encode_passages(
    passages: Sequence[Passage],
    encode_fn: EncodeFn,
    tokenize_fn: TokenizeFn,
    *,
    batch_size: int,
    dtype: str = "float32",
    input_mode: str = "pair",
    devices: Sequence[jax.Device] | None = None,
) -> np.ndarray:
    """``[len(passages), D]`` vectors of some passages in the storage ``dtype``, batched and padded as
    ``embed_passages`` does (e.g. the new and changed passages of a corpus update)."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    encoder = _BatchEncoder(encode_fn, tokenize_fn, batch_size, input_mode, list(devices or jax.local_devices()))
    batches = (passages[i : i + batch_size] for i in range(0, len(passages), batch_size))
    return encoder.encode(batches, len(passages), STORAGE_DTYPES[dtype])


class EmbeddingShards:
    """A read-only ``[N, D]`` array made of consecutive row shards (memory-mapped ``.npy`` files),
    without concatenating them: ``shape``, ``dtype``, ``len``, integer rows and contiguous row
    slices (``x[a:b]`` copies only those rows), and ``np.asarray(x)`` for the whole array."""

    def __init__(self, shards: Sequence[np.ndarray]):
        if not shards:
            raise ValueError("no shards")
        dims = {a.shape[1] for a in shards}
        if len(dims) != 1 or len({a.dtype for a in shards}) != 1:
            raise ValueError(f"shards disagree on dim or dtype: {[(a.shape, a.dtype) for a in shards]}")
        self.shards = list(shards)
        self.starts = np.cumsum([0] + [len(a) for a in shards])
        self.shape = (int(self.starts[-1]), dims.pop())
        self.dtype = shards[0].dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            i = range(self.shape[0])[key]
            s = int(np.searchsorted(self.starts, i, side="right")) - 1
            return np.asarray(self.shards[s][i - self.starts[s]])
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("EmbeddingShards supports an integer row or a contiguous row slice")
        start, stop, _ = key.indices(self.shape[0])
        pieces = []
        for s, a in enumerate(self.shards):
            lo, hi = max(start, self.starts[s]), min(stop, self.starts[s + 1])
            if lo < hi:
                pieces.append(a[lo - self.starts[s] : hi - self.starts[s]])
        return np.concatenate(pieces) if pieces else np.empty((0, self.shape[1]), self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


def read_manifest(out_dir: str) -> dict:
    """The manifest of an embedding job's folder (its settings: ``encoder_name``, ``input_mode``, ...)."""
    if not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        raise InputFileError(f"no {MANIFEST}: not a folder written by `rag-jax embed`", where=out_dir)
    with open(os.path.join(out_dir, MANIFEST)) as f:
        return json.load(f)


def load_embeddings(out_dir: str, mmap: bool = True, store: PassageStore | None = None) -> "EmbeddingShards | np.ndarray":
    """The embeddings an ``embed_passages`` job wrote: with ``mmap`` an ``EmbeddingShards`` over
    memory-mapped shards (nothing read yet), else one ``np.ndarray`` in memory. bfloat16 comes back
    as ``ml_dtypes.bfloat16``. Refuses an incomplete job, and, when ``store`` is given, embeddings
    of another version of the corpus or of another passage count."""
    manifest = read_manifest(out_dir)
    missing = [s for s in range(manifest["num_shards"]) if not os.path.exists(shard_path(out_dir, s))]
    if missing:
        raise InputFileError(f"the embedding job is incomplete: {len(missing)} of {manifest['num_shards']} shards "
                             f"missing (first: {missing[0]}); run `rag-jax embed` again to finish it",
                             where=out_dir)  # fmt: skip
    if store is not None:
        if manifest["num_passages"] != len(store):
            raise InputFileError(f"holds {manifest['num_passages']} embeddings but the store has {len(store)} passages",
                                 where=out_dir)  # fmt: skip
        fp = store.fingerprint
        if manifest["source"] != {"size": fp["size"], "mtime_ns": fp["mtime_ns"], "num_passages": fp["num_passages"]}:
            raise InputFileError(f"was embedded from another version of {store.path} ({manifest['source']} vs {fp})",
                                 where=out_dir)  # fmt: skip
    shards = [np.load(shard_path(out_dir, s), mmap_mode="r" if mmap else None) for s in range(manifest["num_shards"])]
    if manifest["dtype"] == "bfloat16":
        shards = [a.view(ml_dtypes.bfloat16) for a in shards]
    total = sum(len(a) for a in shards)
    if total != manifest["num_passages"]:
        raise ValueError(f"{out_dir}: the shards hold {total} rows, the manifest says {manifest['num_passages']}")
    return EmbeddingShards(shards) if mmap else np.concatenate(shards)


def write_embedding_rows(embeddings, out_dir: str, rows: np.ndarray, vectors: np.ndarray, settings: dict) -> dict:
    """Write an embedding folder whose row ``i`` is ``embeddings[rows[i]]`` (any ``[N, D]`` array with
    contiguous row slices, e.g. ``load_embeddings``'s) or, where ``rows[i]`` is -1, the next row of
    ``vectors``; shards of ``settings["shard_size"]`` rows in ``settings["dtype"]``, and a manifest of
    ``settings`` with the counts (its ``source`` must fingerprint the corpus the rows are of). Returns
    the manifest."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    dtype = STORAGE_DTYPES[settings["dtype"]]
    if int((rows == -1).sum()) != len(vectors):
        raise ValueError(f"{int((rows == -1).sum())} rows marked new but {len(vectors)} vectors given")
    shard_size, dim, used = settings["shard_size"], embeddings.shape[1], 0
    os.makedirs(out_dir, exist_ok=True)
    for s in range(num_shards(len(rows), shard_size)):
        part = rows[s * shard_size : (s + 1) * shard_size]
        block = np.empty((len(part), dim), dtype)
        new = part == -1
        block[new] = vectors[used : used + int(new.sum())]
        used += int(new.sum())
        starts = np.flatnonzero(np.concatenate([[True], (np.diff(part) != 1) | new[1:] | new[:-1]]))
        for a, b in zip(starts.tolist(), np.append(starts[1:], len(part)).tolist()):
            if part[a] != -1:  # a run of consecutive old rows: one slice
                block[a:b] = embeddings[int(part[a]) : int(part[a]) + b - a]
        _save_shard_atomic(shard_path(out_dir, s), block)
    manifest = {**settings, "num_passages": len(rows), "num_shards": num_shards(len(rows), shard_size), "dim": dim,
                "complete": True}  # fmt: skip
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def write_scaled_embeddings(src_dir: str, dst_dir: str, scale: float) -> None:
    """``src_dir``'s embeddings times ``scale`` in ``dst_dir``: the same shards, dtype and manifest (which
    records the factor in ``scaled_by``). E.g. a retrieval score scale folded into the passage vectors,
    for a consumer that scores ``q . d`` with no scale (transformers' RAG)."""
    manifest = read_manifest(src_dir)
    os.makedirs(dst_dir, exist_ok=True)
    for s, shard in enumerate(load_embeddings(src_dir).shards):
        _save_shard_atomic(shard_path(dst_dir, s), (np.asarray(shard, np.float32) * scale).astype(shard.dtype))
    write_json_atomic(os.path.join(dst_dir, MANIFEST), {**manifest, "scaled_by": manifest.get("scaled_by", 1.0) * scale})
