"""transformers ``BartForConditionalGeneration`` weights <-> ``rag_jax.models.bart.Bart``, both directions.

One key table, built from the model's own variable paths, serves both directions, so they cannot
drift apart: layer i of the stacked variable ``encoder/layers/self_attn/q_proj/kernel`` ``[L, D, D]`` is
the transformers key ``model.encoder.layers.{i}.self_attn.q_proj.weight`` (transposed: torch stores
Linear weights as ``[out, in]``); the per-layer tensors are stacked on load and unstacked on save.
``final_logits_bias`` is ``[1, V]`` in transformers and ``[V]`` here.

transformers writes the tied token embedding once, as ``model.shared.weight``; other checkpoints may
carry it (also) as ``model.encoder.embed_tokens.weight``, ``model.decoder.embed_tokens.weight`` or
``lm_head.weight``. Those aliases are folded into ``model.shared.weight`` (equal duplicates accepted,
differing ones refused). As in transformers (``_keys_to_ignore_on_load_missing``), a checkpoint
without ``final_logits_bias`` gets zeros. Anything else missing or unexpected raises
``CheckpointKeyError`` naming the keys.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rag_jax.hf.io import CheckpointKeyError, check_keys, resolve_aliases
from rag_jax.models.bart import Bart
from rag_jax.models.configs import BartConfig

SHARED = "model.shared.weight"
FINAL_LOGITS_BIAS = "final_logits_bias"
TIED_ALIASES = {
    "model.encoder.embed_tokens.weight": SHARED,
    "model.decoder.embed_tokens.weight": SHARED,
    "lm_head.weight": SHARED,
}
"""Other names under which checkpoints store the tied token embedding -> the name we read and write."""


@dataclasses.dataclass(frozen=True)
class _Transform:
    """How an array changes between the transformers layout and ours."""

    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


_IDENTITY = _Transform(lambda a: a, lambda a: a)
_TRANSPOSE = _Transform(lambda a: a.T, lambda a: a.T)
_ROW = _Transform(lambda a: a.reshape(a.shape[-1]), lambda a: a[None, :])

# our leaf name -> (transformers leaf name, transform)
_LEAVES = {
    "kernel": ("weight", _TRANSPOSE),
    "bias": ("bias", _IDENTITY),
    "scale": ("weight", _IDENTITY),
    "embedding": ("weight", _IDENTITY),
}


STACKED = "layers"
"""A variable under a module of this name has a leading layer axis; transformers keys number the layers there."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: tuple
    transform: _Transform
    layer: int | None  # the index on the variable's leading layer axis; None: not stacked

    def layer_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this entry's part of a variable of ours with ``shape`` (one layer when stacked)."""
        return shape if self.layer is None else shape[1:]

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The transformers shape of this entry's part of a variable with ``shape`` (computed without data)."""
        return jax.eval_shape(self.transform.to_hf, jax.ShapeDtypeStruct(self.layer_shape(shape), jnp.float32)).shape


def _hf_key(path: tuple, layer: int | None) -> tuple[str, _Transform]:
    if path == (FINAL_LOGITS_BIAS,):
        return FINAL_LOGITS_BIAS, _ROW
    leaf, transform = _LEAVES[path[-1]]
    names = list(map(str, path[:-1]))
    if layer is not None:
        names.insert(names.index(STACKED) + 1, str(layer))
    return ".".join(["model", *names, leaf]), transform


def key_table(state: nnx.State) -> dict[str, _Entry]:
    """transformers key (without prefix) -> our variable path, layer and layout transform, for every
    variable (one key per layer of a stacked variable)."""
    table = {}
    for path, variable in nnx.to_flat_state(state):
        layers = range(variable.shape[0]) if STACKED in path else [None]
        for layer in layers:
            key, transform = _hf_key(path, layer)
            table[key] = _Entry(path, transform, layer)
    return table


def bart_from_hf(
    state: Mapping[str, np.ndarray],
    cfg: BartConfig,
    prefix: str = "",
    *,
    dtype=None,
    param_dtype=jnp.float32,
    remat: str = "none",
) -> Bart:
    """A ``Bart`` holding the weights of a transformers state dict.

    Only keys starting with ``prefix`` are read (e.g. ``"rag.generator."`` in a RAG checkpoint; keys
    outside it are the caller's business); every key under it must be one the model expects. The model
    is created abstractly (``nnx.eval_shape``) and filled, so no random weights are initialised.
    """
    where = f"BART checkpoint (prefix {prefix!r})"
    abstract = nnx.eval_shape(lambda: Bart(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, remat=remat))
    graphdef, abstract_state = nnx.split(abstract)
    table = {prefix + key: entry for key, entry in key_table(abstract_state).items()}
    aliases = {prefix + alias: prefix + canonical for alias, canonical in TIED_ALIASES.items()}
    weights = resolve_aliases({k: v for k, v in state.items() if k.startswith(prefix)}, aliases, where)
    weights.setdefault(prefix + FINAL_LOGITS_BIAS, np.zeros((1, cfg.vocab_size), np.float32))
    check_keys(table, weights, where)

    flat = dict(nnx.to_flat_state(abstract_state))
    values: dict[tuple, dict[int | None, np.ndarray]] = {}  # path -> layer -> array
    for key, entry in table.items():
        shape = flat[entry.path].shape
        value = entry.transform.to_ours(np.asarray(weights[key]))
        if value.shape != entry.layer_shape(shape):
            raise CheckpointKeyError(
                f"{where}: {key!r} has shape {weights[key].shape}, expected {entry.hf_shape(shape)}"
            )
        values.setdefault(entry.path, {})[entry.layer] = value
    filled = []
    for path, by_layer in values.items():
        value = by_layer[None] if None in by_layer else np.stack([by_layer[i] for i in range(len(by_layer))])
        filled.append((path, flat[path].replace(jnp.asarray(value, flat[path].dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def bart_state_to_hf(model: Bart, prefix: str = "") -> dict[str, np.ndarray]:
    """The transformers state dict of ``model``: exactly the keys ``save_pretrained`` writes."""
    state = nnx.state(model)
    arrays = {path: np.asarray(variable.get_value()) for path, variable in nnx.to_flat_state(state)}
    state_dict = {}
    for key, entry in key_table(state).items():
        value = arrays[entry.path] if entry.layer is None else arrays[entry.path][entry.layer]
        state_dict[prefix + key] = np.ascontiguousarray(entry.transform.to_hf(value))
    return state_dict
