"""The optimizer: AdamW with linear warmup then polynomial (linear by default) decay, global-norm
clipping, weight decay only on matrices, and frozen parameter groups that get no update and no
optimizer state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

from rag_jax.sharding import path_str

# Parameter-name fragments that never get weight decay (biases and normalisation parameters), the
# usual `no_decay = ["bias", "LayerNorm.weight"]` of transformers' fine-tuning scripts.
NO_DECAY_FRAGMENTS = ("bias", "norm", "scale")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup + polynomial decay. The defaults are the RAG fine-tuning recipe used with
    the transformers reference (lr 3e-5, weight decay 0.001, clip 0.1, warmup 500)."""

    learning_rate: float = 3e-5
    warmup_steps: int = 500
    total_steps: int = 100_000
    end_learning_rate: float = 0.0
    decay_power: float = 1.0  # 1.0 = linear decay
    weight_decay: float = 0.001
    clip_norm: float | None = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


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


def weight_decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but biases and norm parameters."""

    def decays(path, _):
        names = path_str(path).lower().split("/")
        return not any(frag in name for name in names[-2:] for frag in NO_DECAY_FRAGMENTS)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, trainable: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
    """AdamW + clipping. ``trainable(params)`` gives a pytree of bools (same structure as params);
    parameters marked False are frozen: zero update and no Adam moments."""
    transforms = []
    if cfg.clip_norm is not None:
        transforms.append(optax.clip_by_global_norm(cfg.clip_norm))
    transforms.append(
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=weight_decay_mask,
        )
    )
    tx = optax.chain(*transforms)
    if trainable is None:
        return tx

    def labels(params):
        return jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
