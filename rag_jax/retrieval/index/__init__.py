"""MIPS indexes over passage embeddings: ``base`` (the interface, checks, metadata, top-k merge),
``exact`` (on device), ``scann`` (host), ``sharded`` (several of either over row ranges)."""

import jax

from rag_jax.retrieval.index.base import Index, exact_search_numpy, merge_topk, read_meta
from rag_jax.retrieval.index.exact import ExactIndex
from rag_jax.retrieval.index.scann import ScannIndex
from rag_jax.retrieval.index.sharded import ProcessShardedIndex, ShardedIndex, build_sharded

INDEX_CLASSES = {"exact": ExactIndex, "scann": ScannIndex, "sharded": ShardedIndex}


def load_index(directory: str, processes: tuple[int, int] | None = None, **kwargs):
    """Load any saved index; ``kwargs`` go to the class's ``load`` (e.g. ``devices`` for exact).

    ``processes=(process_index, process_count)`` (a multi-host run): a sharded index is split over the
    processes (``ProcessShardedIndex``: this process loads only its shards, searches are collective) and
    exact indexes live on this process's devices."""
    meta = read_meta(directory)
    kind = meta["kind"]
    if kind not in INDEX_CLASSES:
        raise ValueError(f"{directory}: unknown index kind {kind!r}")
    if processes is None:
        return INDEX_CLASSES[kind].load(directory, **kwargs)
    if "exact" in (kind, meta.get("shard_kind")):
        kwargs.setdefault("devices", jax.local_devices())
    if kind == "sharded":
        return ProcessShardedIndex.load(directory, *processes, **kwargs)
    return INDEX_CLASSES[kind].load(directory, **kwargs)


__all__ = ["ExactIndex", "INDEX_CLASSES", "Index", "ProcessShardedIndex", "ScannIndex", "ShardedIndex", "build_sharded", "exact_search_numpy",
           "load_index", "merge_topk"]
