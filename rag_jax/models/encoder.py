"""Sentence/passage encoders: BERT + pooling, loaded from and exported to transformers folders.

Three checkpoint kinds are read, each from a local transformers folder:

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
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp

from rag_jax.config import BertConfig
from rag_jax.convert.bert import bert_params_from_hf, bert_params_to_hf
from rag_jax.convert.common import model_folder, read_config, read_state_dict, write_config, write_state_dict
from rag_jax.models.bert import Params, dense, encode

POOLINGS = ("cls", "mean", "mean_normalized")

# kind -> (transformers architecture, key prefix of the BertModel when written, default pooling)
KINDS = {
    "dpr_question": ("DPRQuestionEncoder", "question_encoder.bert_model.", "cls"),
    "dpr_context": ("DPRContextEncoder", "ctx_encoder.bert_model.", "cls"),
    "bert": ("BertModel", "", "cls"),
    "sentence_transformers": ("BertModel", "", "mean"),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# sentence-transformers files copied unchanged on export: (file, lives in the Transformer module folder)
ST_SIDE_FILES = (("sentence_bert_config.json", True), ("config_sentence_transformers.json", False))
ST_MODULES = "modules.json"
ST_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


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
    remat: bool = False,
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
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {tuple(KINDS)}")

    @property
    def dim(self) -> int:
        return self.config.output_dim

    def encode(self, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
        """Vectors [B, dim] (float32), deterministic (no dropout), jitted."""
        return _pooled_encode_jit(
            self.params, jnp.asarray(input_ids), jnp.asarray(attention_mask),
            None if token_type_ids is None else jnp.asarray(token_type_ids),
            cfg=self.config, pooling=self.pooling,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Loading


def _module_class(module: dict) -> str:
    return module["type"].rsplit(".", 1)[-1]


def _read_sentence_transformers(folder: str) -> tuple[str, str] | None:
    """(Transformer module folder, pooling) of a sentence-transformers folder, else None."""
    modules_path = os.path.join(folder, ST_MODULES)
    if not os.path.isfile(modules_path):
        return None
    with open(modules_path, encoding="utf-8") as f:
        modules = sorted(json.load(f), key=lambda m: m["idx"])
    classes = [_module_class(m) for m in modules]
    if classes not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ValueError(f"{modules_path}: modules {classes} are not supported (Transformer, Pooling[, Normalize])")
    with open(os.path.join(folder, modules[1]["path"], "config.json"), encoding="utf-8") as f:
        pooling_config = json.load(f)
    mode = pooling_config.get("pooling_mode")  # sentence-transformers >= 6; older: pooling_mode_* flags
    if mode is None:
        modes = [m for key, m in ST_LEGACY_POOLING.items() if pooling_config.get(key)] or ["mean"]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    normalize = classes[-1] == "Normalize"
    if modes == ["mean"]:
        pooling = "mean_normalized" if normalize else "mean"
    elif modes == ["cls"] and not normalize:
        pooling = "cls"
    else:
        raise ValueError(f"{folder}: pooling {modes} (normalize: {normalize}) is not supported")
    return os.path.join(folder, modules[0]["path"]), pooling


def _detect_kind(hf_config: dict, state: dict, folder: str) -> str:
    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures") or []
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
        raise ValueError(f"{folder}: a decoder BERT (is_decoder / add_cross_attention) is not supported")
    if model_type == "bert":
        return "bert"
    if model_type != "dpr":
        raise ValueError(f"{folder}: model_type {model_type!r} is not a BERT or DPR encoder")
    dpr_kinds = [k for k in KINDS if k.startswith("dpr")]
    if architectures:
        kinds = [k for k in dpr_kinds if KINDS[k][0] in architectures]
    else:  # fall back to the key layout
        kinds = [k for k in dpr_kinds if any(key.startswith(KINDS[k][1]) for key in state)]
    if len(kinds) != 1:
        raise ValueError(f"{folder}: not a DPRQuestionEncoder or DPRContextEncoder (architectures {architectures})")
    return kinds[0]


def load_encoder(path: str | os.PathLike, pooling: str | None = None) -> Encoder:
    """An Encoder from a local transformers (DPR, BertModel) or sentence-transformers folder.

    ``pooling`` overrides the kind's default (DPR and BertModel: "cls"; sentence-transformers: what
    its Pooling/Normalize modules say). Keys are checked strictly against the config.
    """
    folder = model_folder(path)
    st = _read_sentence_transformers(folder)
    bert_folder = st[0] if st else folder
    hf_config = read_config(bert_folder)
    state = read_state_dict(bert_folder)
    kind = "sentence_transformers" if st else _detect_kind(hf_config, state, folder)
    cfg = BertConfig.from_hf(hf_config)
    prefix = KINDS[kind][1]
    if kind != "sentence_transformers" and prefix == "" and "bert.embeddings.word_embeddings.weight" in state:
        prefix = "bert."  # a BertModel saved inside a BertFor* model
    pooler = not kind.startswith("dpr") and f"{prefix}pooler.dense.weight" in state
    params = bert_params_from_hf(state, cfg, prefix, pooler=pooler, where=bert_folder)
    return Encoder(
        params=jax.device_put(params),
        config=cfg,
        pooling=pooling or (st[1] if st else KINDS[kind][2]),
        kind=kind,
        source_path=folder,
        hf_config=hf_config,
    )


# ----------------------------------------------------------------------------------------------
# Export


def hf_config_dict(encoder: Encoder) -> dict[str, Any]:
    """The config.json for ``encoder``'s kind: its source config's fields, updated from its config."""
    architecture, _, _ = KINDS[encoder.kind]
    is_dpr = encoder.kind.startswith("dpr")
    if not is_dpr and encoder.config.projection_dim > 0:
        raise ValueError(f"a {encoder.kind} checkpoint cannot hold a projection (projection_dim > 0)")
    d = dict(encoder.hf_config or {})
    d.update(encoder.config.to_hf_dict())
    d.update(model_type="dpr" if is_dpr else "bert", architectures=[architecture])
    if is_dpr:
        d["projection_dim"] = encoder.config.projection_dim
    return d


def _sentence_transformers_files(encoder: Encoder, folder: str) -> None:
    modules = [("Transformer", ""), ("Pooling", "1_Pooling")]
    if encoder.pooling == "mean_normalized":
        modules.append(("Normalize", "2_Normalize"))
    entries = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{cls}"}
        for i, (cls, path) in enumerate(modules)
    ]
    with open(os.path.join(folder, ST_MODULES), "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=2)
    mode = "cls" if encoder.pooling == "cls" else "mean"
    pooling_config = {
        "word_embedding_dimension": encoder.config.hidden_size,
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    write_config(pooling_config, os.path.join(folder, "1_Pooling"))
    if encoder.pooling == "mean_normalized":
        write_config({}, os.path.join(folder, "2_Normalize"))


def _copy_source_files(encoder: Encoder, folder: str) -> None:
    """Tokenizer (and sentence-transformers side) files of the source folder, when known."""
    if encoder.source_path is None:
        return
    st = _read_sentence_transformers(encoder.source_path) if encoder.kind == "sentence_transformers" else None
    module_folder = st[0] if st else encoder.source_path
    names = [(name, module_folder) for name in TOKENIZER_FILES]
    if st:
        names += [(name, module_folder if in_module else encoder.source_path) for name, in_module in ST_SIDE_FILES]
    for name, src in names:
        source, target = os.path.join(src, name), os.path.join(folder, name)
        if os.path.isfile(source) and os.path.realpath(source) != os.path.realpath(target):
            shutil.copyfile(source, target)


def save_encoder_hf(encoder: Encoder, path: str | os.PathLike) -> None:
    """Write ``encoder`` as a transformers folder of its kind (config.json + model.safetensors).

    DPR kinds load with ``DPRQuestionEncoder`` / ``DPRContextEncoder.from_pretrained``, "bert" with
    ``BertModel``; "sentence_transformers" also gets modules.json and its pooling folders so that
    ``SentenceTransformer(path)`` loads it. Tokenizer files are copied from ``source_path``. An
    unused BertModel pooler is not written for the DPR kinds (DPR has none).
    """
    folder = os.fspath(path)
    config = hf_config_dict(encoder)
    params = encoder.params
    if encoder.kind.startswith("dpr"):  # DPR has no pooler: drop the unused one of a BertModel source
        params = {k: v for k, v in params.items() if k != "pooler"}
    write_state_dict(bert_params_to_hf(params, encoder.config, KINDS[encoder.kind][1]), folder)
    write_config(config, folder)
    if encoder.kind == "sentence_transformers":
        _sentence_transformers_files(encoder, folder)
    _copy_source_files(encoder, folder)
