"""The optimizer: AdamW with linear warmup then polynomial (linear by default) decay, global-norm
clipping, weight decay only on matrices, parameter groups with their own peak learning rate, and
frozen groups that get no update and no optimizer state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rag_jax.config import OptimizerConfig
from rag_jax.training.sharding import path_str

# Parameter-name fragments that never get weight decay (biases and normalisation parameters), the
# usual `no_decay = ["bias", "LayerNorm.weight"]` of transformers' fine-tuning scripts.
NO_DECAY_FRAGMENTS = ("bias", "norm", "scale")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """0 -> peak linearly over ``warmup_steps``, then polynomial decay to ``end_learning_rate`` at
    ``total_steps`` (held there afterwards)."""
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    decay = optax.polynomial_schedule(
        cfg.learning_rate,
        cfg.end_learning_rate,
        power=cfg.decay_power,
        transition_steps=max(cfg.total_steps - cfg.warmup_steps, 1),
    )
    if cfg.warmup_steps <= 0:
        return decay
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves together. The train step's ``grad_norm`` metric and the clipping
    below compute it with the same ops, so XLA computes it once per step."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` as one scalar factor ``min(1, max_norm / norm)`` times the
    gradients. Same result, up to rounding (optax: ``g / norm * max_norm`` when clipping), but the
    multiply fuses into the Adam moment updates: optax's per-element select makes XLA:CPU write the
    clipped gradients out and read them back, which doubled the optimizer's time (BART-base + BERT-base:
    0.65 s -> 0.3 s per step on 2 cores, experiments/RESULTS.md)."""

    def update(updates, state, params=None):
        del params
        factor = jnp.minimum(1.0, max_norm / global_norm(updates))
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def weight_decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but biases and norm parameters."""

    def decays(path, _):
        names = path_str(path).lower().split("/")
        return not any(frag in name for name in names[-2:] for frag in NO_DECAY_FRAGMENTS)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    cfg: OptimizerConfig,
    group_of: Callable[[Any], Any] | None = None,
    learning_rates: Mapping[str, float] | None = None,
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on ``cfg``'s schedule.

    ``group_of(params)`` gives a pytree of group names (the structure of params): parameters in the
    group "frozen" get zero updates and no Adam moments; every other group is trained with the peak
    learning rate ``learning_rates[group]`` (default ``cfg.learning_rate``), same warmup and decay.
    The clipping norm is taken over all gradients together."""
    clip = [] if cfg.clip_norm is None else [clip_by_global_norm(cfg.clip_norm)]

    def adamw(learning_rate: float) -> optax.GradientTransformation:
        schedule = learning_rate_schedule(dataclasses.replace(cfg, learning_rate=learning_rate))
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=weight_decay_mask)  # fmt: skip

    if group_of is None:
        return optax.chain(*clip, adamw(cfg.learning_rate))
    groups = {"train": adamw(cfg.learning_rate), "frozen": optax.set_to_zero()}
    groups.update({name: adamw(rate) for name, rate in (learning_rates or {}).items()})
    return optax.chain(*clip, optax.multi_transform(groups, group_of))
