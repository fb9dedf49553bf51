"""Encoders from and to transformers folders: DPR question/context encoders, ``BertModel`` and
sentence-transformers (see ``rag_jax.models.encoder`` for what each kind computes)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax

from rag_jax.hf.bert import bert_params_from_hf, bert_params_to_hf
from rag_jax.hf.io import model_folder, read_config, read_state_dict, write_config, write_state_dict
from rag_jax.models.configs import BertConfig
from rag_jax.models.encoder import ENCODER_KINDS, Encoder

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
assert tuple(KINDS) == ENCODER_KINDS


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
