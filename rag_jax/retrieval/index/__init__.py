"""MIPS indexes over passage embeddings: ``base`` (the interface, checks, metadata, top-k merge),
``exact`` (on device), ``scann`` (host), ``sharded`` (several of either over row ranges)."""

from rag_jax.retrieval.index.base import Index, exact_search_numpy, merge_topk, read_meta
from rag_jax.retrieval.index.exact import ExactIndex
from rag_jax.retrieval.index.scann import ScannIndex
from rag_jax.retrieval.index.sharded import ShardedIndex, build_sharded

INDEX_CLASSES = {"exact": ExactIndex, "scann": ScannIndex, "sharded": ShardedIndex}


def load_index(directory: str, **kwargs):
    """Load any saved index; ``kwargs`` go to the class's ``load`` (e.g. ``devices`` for exact)."""
    kind = read_meta(directory)["kind"]
    if kind not in INDEX_CLASSES:
        raise ValueError(f"{directory}: unknown index kind {kind!r}")
    return INDEX_CLASSES[kind].load(directory, **kwargs)


__all__ = ["ExactIndex", "INDEX_CLASSES", "Index", "ScannIndex", "ShardedIndex", "build_sharded", "exact_search_numpy",
           "load_index", "merge_topk"]
