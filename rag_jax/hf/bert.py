"""transformers BERT / DPR state dicts <-> rag_jax.models.bert parameter pytrees.

One key table, used in both directions, maps each transformers key to a parameter path plus two
reversible transforms: torch Linear weights are transposed ([out, in] -> [in, out]) and the
per-layer keys ``encoder.layer.{i}.*`` are stacked along a leading layer axis. Both directions are
strict: missing or unexpected keys, and shapes that do not match the config, are refused with an
error that names them.

``prefix`` is where the BertModel sits in the state dict, as transformers 5 saves it:

    BertModel                   ""  (a ``bert.`` prefix when taken from a BertFor* head model)
    DPRQuestionEncoder          "question_encoder.bert_model."
    DPRContextEncoder           "ctx_encoder.bert_model."
    RagToken/SequenceForGen.    "rag.question_encoder.question_encoder.bert_model."

DPR's projection (``projection_dim > 0``) sits next to ``bert_model`` in the same DPREncoder:
``<prefix without "bert_model.">encode_proj.{weight,bias}``.

Accepted and dropped when reading, never written: the buffers ``embeddings.position_ids`` /
``embeddings.token_type_ids`` that older transformers versions saved, and, in a DPR layout, the
BertPooler ``pooler.dense.*`` that DPR checkpoints saved by older transformers versions hold
(DPR never used it; transformers now builds DPR's BertModel without it). A plain BertModel's pooler is kept with
``pooler=True``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from rag_jax.hf.io import CheckpointKeyError, check_keys
from rag_jax.models.bert import init_params
from rag_jax.models.configs import BertConfig

DPR_BERT_SUFFIX = "bert_model."
IGNORED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
DPR_UNUSED_POOLER = ("pooler.dense.weight", "pooler.dense.bias")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: its transformers keys (one per layer when ``stacked``) and its path."""

    hf_keys: tuple[str, ...]
    path: tuple[str, ...]
    transpose: bool  # a torch Linear weight, stored [out, in] by transformers
    stacked: bool  # one transformers key per layer, stacked on a leading axis here


def _linear(hf: str, path: tuple[str, ...]) -> list[tuple[str, tuple[str, ...], bool]]:
    return [(f"{hf}.weight", path + ("kernel",), True), (f"{hf}.bias", path + ("bias",), False)]


def _norm(hf: str, path: tuple[str, ...]) -> list[tuple[str, tuple[str, ...], bool]]:
    return [(f"{hf}.weight", path + ("scale",), False), (f"{hf}.bias", path + ("bias",), False)]


# (transformers name, parameter path, transpose), relative to the BertModel prefix.
_EMBEDDINGS = [
    ("embeddings.word_embeddings.weight", ("embeddings", "word"), False),
    ("embeddings.position_embeddings.weight", ("embeddings", "position"), False),
    ("embeddings.token_type_embeddings.weight", ("embeddings", "token_type"), False),
    *_norm("embeddings.LayerNorm", ("embeddings", "norm")),
]
# Relative to ``encoder.layer.{i}.``; stacked over layers under ``layers``.
_LAYER = [
    *_linear("attention.self.query", ("layers", "query")),
    *_linear("attention.self.key", ("layers", "key")),
    *_linear("attention.self.value", ("layers", "value")),
    *_linear("attention.output.dense", ("layers", "attn_out")),
    *_norm("attention.output.LayerNorm", ("layers", "attn_norm")),
    *_linear("intermediate.dense", ("layers", "mlp_in")),
    *_linear("output.dense", ("layers", "mlp_out")),
    *_norm("output.LayerNorm", ("layers", "mlp_norm")),
]
_POOLER = _linear("pooler.dense", ("pooler",))
_PROJECTION = _linear("encode_proj", ("projection",))  # relative to the DPREncoder prefix


def is_dpr_layout(prefix: str) -> bool:
    return prefix.endswith(DPR_BERT_SUFFIX)


def ignored_keys(prefix: str) -> set[str]:
    """Keys accepted in a file and dropped: old buffers, and a DPR encoder's unused pooler."""
    return {prefix + k for k in IGNORED_BUFFERS + (DPR_UNUSED_POOLER if is_dpr_layout(prefix) else ())}


def projection_prefix(prefix: str) -> str:
    """The DPREncoder prefix holding ``encode_proj`` for a BertModel at ``prefix``."""
    if not is_dpr_layout(prefix):
        raise ValueError(f"projection_dim > 0 needs a DPR layout: {prefix!r} should end in {DPR_BERT_SUFFIX!r}")
    return prefix[: -len(DPR_BERT_SUFFIX)]


def key_table(cfg: BertConfig, prefix: str, *, pooler: bool = False) -> list[Entry]:
    """The table: every transformers key of a BertModel/DPR encoder and its parameter path."""
    table = [Entry((prefix + hf,), path, t, False) for hf, path, t in _EMBEDDINGS]
    layer_prefixes = [f"{prefix}encoder.layer.{i}." for i in range(cfg.num_hidden_layers)]
    table += [Entry(tuple(p + hf for p in layer_prefixes), path, t, True) for hf, path, t in _LAYER]
    if pooler:
        if is_dpr_layout(prefix):
            raise ValueError(f"a DPR encoder ({prefix!r}) has no pooler")
        table += [Entry((prefix + hf,), path, t, False) for hf, path, t in _POOLER]
    if cfg.projection_dim > 0:
        proj = projection_prefix(prefix)
        table += [Entry((proj + hf,), path, t, False) for hf, path, t in _PROJECTION]
    keys = [k for e in table for k in e.hf_keys]
    if len(keys) != len(set(keys)):
        raise CheckpointKeyError(f"key table for prefix {prefix!r} maps a key twice")
    return table


def bert_hf_keys(cfg: BertConfig, prefix: str, *, pooler: bool = False) -> list[str]:
    """Every transformers key a BertModel/DPR encoder at ``prefix`` has, sorted."""
    return sorted(k for e in key_table(cfg, prefix, pooler=pooler) for k in e.hf_keys)


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _paths(tree: Mapping[str, Any]) -> set[tuple[str, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in keypath) for keypath, _ in leaves}


def _expected_shapes(cfg: BertConfig, pooler: bool) -> Any:
    return jax.eval_shape(lambda key: init_params(cfg, key, pooler=pooler), jax.random.key(0))


def _hf_shape(e: Entry, shapes: Any) -> tuple[int, ...]:
    """The shape the config implies for each transformers tensor of ``e``."""
    shape = _get(shapes, e.path).shape
    shape = shape[1:] if e.stacked else shape
    return shape[::-1] if e.transpose else shape


def bert_params_from_hf(
    state: Mapping[str, np.ndarray], cfg: BertConfig, prefix: str, *, pooler: bool = False, where: str = "checkpoint"
) -> dict[str, Any]:
    """Parameters (NumPy arrays) from a transformers state dict holding exactly one encoder.

    ``state`` must hold exactly the table's keys (plus the ``ignored_keys``): filter a larger
    state dict (a RAG checkpoint) by prefix first. ``pooler`` says whether a plain BertModel's
    pooler is expected (and kept).
    ``where`` (a folder name) is put in error messages.
    """
    table = key_table(cfg, prefix, pooler=pooler)
    ignored = ignored_keys(prefix)
    check_keys((k for e in table for k in e.hf_keys), (k for k in state if k not in ignored), where)
    shapes = _expected_shapes(cfg, pooler)
    params: dict[str, Any] = {}
    for e in table:
        arrays = [np.asarray(state[k]) for k in e.hf_keys]
        expected = _hf_shape(e, shapes)
        for key, a in zip(e.hf_keys, arrays):
            if a.shape != expected:
                raise CheckpointKeyError(f"{where}: {key!r} has shape {a.shape}, the config implies {expected}")
        arrays = [a.T if e.transpose else a for a in arrays]
        _set(params, e.path, np.stack(arrays) if e.stacked else arrays[0])
    return params


def bert_params_to_hf(params: Mapping[str, Any], cfg: BertConfig, prefix: str) -> dict[str, np.ndarray]:
    """A transformers state dict (NumPy arrays) from parameters; the pooler is written when present."""
    table = key_table(cfg, prefix, pooler="pooler" in params)
    check_keys(("/".join(e.path) for e in table), ("/".join(p) for p in _paths(params)), "bert params")
    shapes = _expected_shapes(cfg, "pooler" in params)
    state: dict[str, np.ndarray] = {}
    for e in table:
        value, expected = np.asarray(jax.device_get(_get(params, e.path))), _get(shapes, e.path).shape
        if value.shape != expected:
            name = "/".join(e.path)
            raise CheckpointKeyError(f"bert params: {name} has shape {value.shape}, the config implies {expected}")
        for key, a in zip(e.hf_keys, value if e.stacked else [value]):
            state[key] = np.ascontiguousarray(a.T if e.transpose else a)
    return state
