"""Sentence/passage encoders: BERT + pooling (``rag_jax.hf.encoder`` loads them from and exports them to
transformers folders).

Three checkpoint kinds are supported:

- DPR (``DPRQuestionEncoder`` / ``DPRContextEncoder``, model_type "dpr"): the vector is the
  last-layer hidden state of the first ([CLS]) token, no tanh pooler, then ``encode_proj`` when
  ``projection_dim > 0``.
- plain ``BertModel`` (model_type "bert"): CLS pooling by default. Its tanh pooler, when the file
  has one, is kept in the parameters so that exports round-trip, but it is never used.
- sentence-transformers folders (``modules.json`` with Transformer -> Pooling [-> Normalize]):
  mean pooling over the attention mask, L2-normalised when a Normalize module follows
  ("mean_normalized", what all-MiniLM-L6-v2 does), or CLS pooling.

``pooled_encode`` is the pure function (for jitted training steps); ``Encoder`` bundles the
parameters with what is needed to call it and to export them back.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rag_jax.models import bert
from rag_jax.models.bert import Params, dense, encode
from rag_jax.models.configs import BertConfig

POOLINGS = ("cls", "mean", "mean_normalized")

ENCODER_KINDS = ("dpr_question", "dpr_context", "bert", "sentence_transformers")
"""Checkpoint layouts an ``Encoder`` round-trips to (``rag_jax.hf.encoder`` reads and writes them)."""


# ----------------------------------------------------------------------------------------------
# Pooling


def pool(hidden_BxSxD: jax.Array, attention_mask_BxS: jax.Array, pooling: str) -> jax.Array:
    """Pooled vectors [B, D] in float32: CLS token, masked mean, or L2-normalised masked mean."""
    if pooling == "cls":
        return hidden_BxSxD[:, 0].astype(jnp.float32)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
    mask_BxSx1 = attention_mask_BxS[:, :, None].astype(jnp.float32)
    total_BxD = jnp.sum(hidden_BxSxD.astype(jnp.float32) * mask_BxSx1, axis=1)
    mean_BxD = total_BxD / jnp.maximum(jnp.sum(mask_BxSx1, axis=1), 1e-9)
    if pooling == "mean":
        return mean_BxD
    return mean_BxD / jnp.maximum(jnp.linalg.norm(mean_BxD, axis=-1, keepdims=True), 1e-12)


def pooled_encode(
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array | None = None,
    *,
    cfg: BertConfig,
    pooling: str,
    dropout_key: jax.Array | None = None,
    compute_dtype=None,
    remat: str = "none",
) -> jax.Array:
    """Encoder vectors [B, output_dim] (float32): BERT, pooling, then DPR's projection if any.

    With a projection and "mean_normalized" pooling the order is mean -> projection -> normalise.
    """
    hidden_BxSxD = encode(
        params, input_ids, attention_mask, token_type_ids,
        cfg=cfg, dropout_key=dropout_key, compute_dtype=compute_dtype, remat=remat,
    )  # fmt: skip
    normalize = pooling == "mean_normalized"
    vectors_BxD = pool(hidden_BxSxD, attention_mask, "mean" if normalize else pooling)
    if cfg.projection_dim > 0:
        dtype = hidden_BxSxD.dtype
        vectors_BxD = dense(vectors_BxD.astype(dtype), params["projection"], dtype).astype(jnp.float32)
    if normalize:
        vectors_BxD = vectors_BxD / jnp.maximum(jnp.linalg.norm(vectors_BxD, axis=-1, keepdims=True), 1e-12)
    return vectors_BxD


_pooled_encode_jit = jax.jit(pooled_encode, static_argnames=("cfg", "pooling", "compute_dtype", "remat"))


# ----------------------------------------------------------------------------------------------
# Encoder


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
    """BERT parameters plus how to pool them and where they came from.

    ``kind`` is the checkpoint layout ("dpr_question", "dpr_context", "bert",
    "sentence_transformers") used on export; ``source_path`` (the folder it was loaded from, if any)
    is where tokenizer files are copied from; ``hf_config`` is the source config.json, whose fields
    are kept on export.
    """

    params: Params
    config: BertConfig
    pooling: str
    kind: str
    source_path: str | None = None
    hf_config: dict | None = None

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
        if self.kind not in ENCODER_KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {ENCODER_KINDS}")

    @property
    def dim(self) -> int:
        return self.config.output_dim

    def logical_axes(self) -> dict:
        """The logical axes of every parameter, in the structure of ``params`` (``bert.logical_axes``)."""
        return bert.logical_axes(self.config, pooler="pooler" in self.params)

    def encode(self, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
        """Vectors [B, dim] (float32), deterministic (no dropout), jitted."""
        return _pooled_encode_jit(
            self.params, jnp.asarray(input_ids), jnp.asarray(attention_mask),
            None if token_type_ids is None else jnp.asarray(token_type_ids),
            cfg=self.config, pooling=self.pooling,
        )  # fmt: skip
