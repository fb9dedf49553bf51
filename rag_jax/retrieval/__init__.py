"""RAG's non-parametric memory: the passage corpus, its embeddings, and MIPS indexes over them.

Rows are the one key shared by all three: row ``i`` of a ``PassageStore`` is row ``i`` of the
embeddings ``embed_passages`` writes and id ``i`` in every index's search results. ``Retriever``
turns questions into the generator's inputs over one such corpus (``retriever.py``, ``context.py``);
``IndexGenerations`` holds the corpus re-embedded and re-indexed with snapshots of a document encoder
in training (``generations.py``); ``update_corpus`` adds, replaces and deletes passages of a corpus
without embedding it again or retraining its index (``update.py``).
"""

from rag_jax.retrieval.bm25 import BM25Index
from rag_jax.retrieval.context import ContextFormat, context_string, context_strings, tokenize_contexts
from rag_jax.retrieval.corpus import (
    MalformedLineError,
    Passage,
    PassageStore,
    read_passages,
    split_into_passages,
    write_passages_tsv,
)
from rag_jax.retrieval.embed import (
    EmbeddingShards,
    embed_passages,
    hf_tokenize_fn,
    load_embeddings,
    passage_inputs,
    read_manifest,
    write_scaled_embeddings,
)
from rag_jax.retrieval.generations import IndexGenerations, build_generation, index_kind, snapshot_encode_fn
from rag_jax.retrieval.index import (
    ExactIndex,
    Index,
    ProcessShardedIndex,
    ScannIndex,
    ShardedIndex,
    build_sharded,
    exact_search_numpy,
    load_index,
    merge_topk,
)
from rag_jax.retrieval.retriever import RetrievedBatch, Retriever, train_batch
from rag_jax.retrieval.update import UpdatedCorpus, read_updates, update_corpus

__all__ = [
    "BM25Index",
    "ContextFormat",
    "EmbeddingShards",
    "ExactIndex",
    "Index",
    "IndexGenerations",
    "MalformedLineError",
    "Passage",
    "PassageStore",
    "ProcessShardedIndex",
    "RetrievedBatch",
    "Retriever",
    "ScannIndex",
    "ShardedIndex",
    "UpdatedCorpus",
    "build_generation",
    "build_sharded",
    "context_string",
    "context_strings",
    "embed_passages",
    "exact_search_numpy",
    "hf_tokenize_fn",
    "index_kind",
    "load_embeddings",
    "load_index",
    "merge_topk",
    "passage_inputs",
    "read_manifest",
    "read_passages",
    "read_updates",
    "snapshot_encode_fn",
    "split_into_passages",
    "tokenize_contexts",
    "train_batch",
    "update_corpus",
    "write_passages_tsv",
    "write_scaled_embeddings",
]
