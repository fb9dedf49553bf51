"""RAG's non-parametric memory: the passage corpus, its embeddings, and MIPS indexes over them.

Rows are the one key shared by all three: row ``i`` of a ``PassageStore`` is row ``i`` of the
embeddings ``embed_passages`` writes and id ``i`` in every index's search results.
"""

from rag_jax.retrieval.corpus import (
    MalformedLineError,
    Passage,
    PassageStore,
    read_passages,
    split_into_passages,
    write_passages_tsv,
)
from rag_jax.retrieval.embed import EmbeddingShards, embed_passages, hf_tokenize_fn, load_embeddings, passage_inputs
from rag_jax.retrieval.exact import ExactIndex
from rag_jax.retrieval.index import Index, exact_search_numpy, load_index, merge_topk
from rag_jax.retrieval.scann_index import ScannIndex
from rag_jax.retrieval.sharded import ShardedIndex, build_sharded

__all__ = [
    "EmbeddingShards",
    "ExactIndex",
    "Index",
    "MalformedLineError",
    "Passage",
    "PassageStore",
    "ScannIndex",
    "ShardedIndex",
    "build_sharded",
    "embed_passages",
    "exact_search_numpy",
    "hf_tokenize_fn",
    "load_embeddings",
    "load_index",
    "merge_topk",
    "passage_inputs",
    "read_passages",
    "split_into_passages",
    "write_passages_tsv",
]
