"""rag_jax: Retrieval-Augmented Generation (Lewis et al. 2020) in JAX/Flax.

Public API (everything else is internal):

- ``load_encoder(path, pooling=None) -> Encoder``: DPR question/context encoders, BertModel and
  sentence-transformers folders; ``Encoder.encode(input_ids, attention_mask) -> [B, D]``.
- ``load_generator(path) -> Generator``: a ``BartForConditionalGeneration`` folder;
  ``Generator.logits(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None)``.
- ``load_rag(path) -> RagModel``: a transformers RAG folder (question encoder + generator);
  ``RagModel.loss(...)`` mirrors ``Rag{Token,Sequence}ForGeneration`` losses.
- ``save_hf(obj, path)``: export any of the three back to a transformers folder.
- ``rag_token_loss`` / ``rag_sequence_loss`` / ``seq2seq_nll``: the objective over logits.
"""

from rag_jax.hf.encoder import load_encoder
from rag_jax.hf.generator import load_generator
from rag_jax.hf.io import CheckpointKeyError
from rag_jax.hf.rag import load_rag, save_hf
from rag_jax.models.configs import BartConfig, BertConfig, RagConfig
from rag_jax.models.encoder import Encoder
from rag_jax.models.generator import Generator
from rag_jax.rag.model import RagModel
from rag_jax.rag.objective import rag_sequence_loss, rag_token_loss, seq2seq_nll

__all__ = [
    "BartConfig",
    "BertConfig",
    "CheckpointKeyError",
    "Encoder",
    "Generator",
    "RagConfig",
    "RagModel",
    "load_encoder",
    "load_generator",
    "load_rag",
    "rag_sequence_loss",
    "rag_token_loss",
    "save_hf",
    "seq2seq_nll",
]
