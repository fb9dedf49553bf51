"""Model configurations as frozen dataclasses, convertible to and from transformers' configs.

The dataclasses are hashable, so they can be closed over or passed as static arguments to
``jax.jit``. ``from_hf`` accepts a transformers config object or its ``to_dict()`` form (what
``config.json`` holds); ``to_hf_dict`` gives a dict that transformers' config classes accept.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def _as_dict(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected a transformers config or a dict, got {type(hf_config).__name__}")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """A BERT encoder (plain BERT, DPR question/context encoders, sentence-transformers)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    projection_dim: int = 0  # DPR only: a linear projection of the CLS vector when > 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def output_dim(self) -> int:
        return self.projection_dim if self.projection_dim > 0 else self.hidden_size

    @classmethod
    def from_hf(cls, hf_config: Any) -> "BertConfig":
        d = _as_dict(hf_config)
        pe = d.get("position_embedding_type", "absolute")
        if pe not in (None, "absolute"):
            raise ValueError(f"BertConfig: position_embedding_type={pe!r} is not supported (only 'absolute')")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.projection_dim == 0:
            d.pop("projection_dim")
        return d


@dataclasses.dataclass(frozen=True)
class BartConfig:
    """A BART encoder-decoder (``BartForConditionalGeneration``).

    ``normalize_before`` selects pre-LN layers with a final layer norm after each stack (the mBART
    layout); the default, post-LN, is BART's.
    """

    vocab_size: int = 50265
    max_position_embeddings: int = 1024
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    scale_embedding: bool = False
    normalize_before: bool = False
    init_std: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = 2

    @classmethod
    def from_hf(cls, hf_config: Any) -> "BartConfig":
        d = _as_dict(hf_config)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in names if k in d}
        if d.get("model_type") == "mbart":
            kwargs["normalize_before"] = True
        for key in ("eos_token_id", "forced_eos_token_id"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = kwargs[key][0]
        for key in ("dropout", "attention_dropout", "activation_dropout"):
            if kwargs.get(key) is None:
                kwargs[key] = 0.0
        if not d.get("tie_word_embeddings", True):
            raise ValueError("BartConfig: tie_word_embeddings=False is not supported (the LM head is tied)")
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d.pop("normalize_before"):
            raise ValueError("a pre-LN (normalize_before=True) generator has no BartConfig equivalent")
        d["num_hidden_layers"] = self.encoder_layers
        d["tie_word_embeddings"] = True
        return d


@dataclasses.dataclass(frozen=True)
class RagConfig:
    """The RAG-specific settings of a transformers ``RagConfig`` (the nested question encoder and
    generator configs live with their models)."""

    n_docs: int = 5
    max_combined_length: int = 300
    title_sep: str = " / "
    doc_sep: str = " // "
    prefix: str | None = None
    label_smoothing: float = 0.0
    exclude_bos_score: bool = False
    reduce_loss: bool = False
    do_deduplication: bool = True
    retrieval_vector_size: int = 768

    @classmethod
    def from_hf(cls, hf_config: Any) -> "RagConfig":
        d = _as_dict(hf_config)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: d[k] for k in names if k in d})

    def to_hf_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
