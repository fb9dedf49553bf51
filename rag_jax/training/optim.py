"""The optimizer: AdamW with linear warmup then polynomial (linear by default) decay, global-norm
clipping, weight decay only on matrices, parameter groups with their own peak learning rate, and
frozen groups that get no update and no optimizer state.

The update is fused, as torch's ``AdamW(fused=True)``: one elementwise computation per parameter
(clip factor times gradient, both moments, bias correction, decoupled weight decay) whose outputs,
the new parameter and moments, are written over the donated old ones; the skip of a non-finite
step is decided inside it. It computes what optax's
``chain(clip_by_global_norm, multi_transform({group: adamw(schedule, mask=weight_decay_mask)}))``
followed by ``params + updates`` computes, up to float32 rounding (tests/training/test_optim.py).

On one CPU device the update of a float32 parameter is a C++ kernel called through XLA's FFI
(``cpu_adamw``: one pass over memory, where XLA:CPU makes three loops of it); elsewhere it is
``adamw_update`` below, which XLA fuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rag_jax.config import OptimizerConfig
from rag_jax.training import cpu_adamw
from rag_jax.training.sharding import path_str

# Parameter-name fragments that never get weight decay (biases and normalisation parameters), the
# usual `no_decay = ["bias", "LayerNorm.weight"]` of transformers' fine-tuning scripts.
NO_DECAY_FRAGMENTS = ("bias", "norm", "scale")
FROZEN = "frozen"  # the group that gets no update and no moments


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


def clip_factor(grads: Any, max_norm: float | None) -> jax.Array | float:
    """``min(1, max_norm / norm)`` (1 without clipping): ``optax.clip_by_global_norm`` as one scalar
    that multiplies the gradients inside the update. Same result up to rounding (optax:
    ``g / norm * max_norm`` when clipping), but optax's per-element select makes XLA:CPU write the
    clipped gradients out and read them back, which doubled the optimizer's time (BART-base +
    BERT-base: 0.65 s -> 0.3 s per step on 2 cores, experiments/RESULTS.md)."""
    return 1.0 if max_norm is None else jnp.minimum(1.0, max_norm / global_norm(grads))


def weight_decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but biases and norm parameters."""

    def decays(path, _):
        names = path_str(path).lower().split("/")
        return not any(frag in name for name in names[-2:] for frag in NO_DECAY_FRAGMENTS)

    return jax.tree_util.tree_map_with_path(decays, params)


# -- one parameter ----------------------------------------------------------------------------------


def _unless(skip: jax.Array | None, new: jax.Array, old: jax.Array) -> jax.Array:
    return new if skip is None else jnp.where(skip, old, new)


def adamw_update(p, g, mu, nu, *, factor, rate, bias_corrections, b1: float, b2: float, eps: float,
                 weight_decay: float, skip=None):  # fmt: skip
    """One parameter's new ``(p, mu, nu)``: the moments of the gradient times the clip ``factor``
    (optax's ``update_moment`` expressions), then ``p + rate * (mu_hat / (sqrt(nu_hat) + eps) + wd * p)``
    with ``rate`` the negative learning rate, the bias-corrected moments ``mu / (1 - b1^t)`` and
    ``nu / (1 - b2^t)``, and no decay term when ``weight_decay`` is 0. The old values where ``skip``."""
    g = g * factor
    mu = _unless(skip, (1 - b1) * g + b1 * mu, mu)
    nu = _unless(skip, (1 - b2) * (g * g) + b2 * nu, nu)
    c1, c2 = bias_corrections
    update = (mu / c1) / (jnp.sqrt(nu / c2) + eps)
    if weight_decay:
        update = update + weight_decay * p
    return _unless(skip, p + rate * update, p), mu, nu


# -- the optimizer ----------------------------------------------------------------------------------


class AdamWState(NamedTuple):
    """The optimizer state, a pytree of arrays: the steps taken, and the first and second moments in
    the parameters' structure (None for frozen parameters)."""

    count: jax.Array
    mu: Any
    nu: Any


@dataclasses.dataclass(frozen=True)
class AdamW:
    """Global-norm clipping, then AdamW on ``cfg``'s schedule, one elementwise update per parameter.

    ``group_of(params)`` gives a pytree of group names (the structure of params): parameters in the
    group "frozen" get no update and no moments; every other group is trained with the peak
    learning rate ``learning_rates[group]`` (default ``cfg.learning_rate``), same warmup and decay.
    The clipping norm is taken over all gradients together."""

    cfg: OptimizerConfig
    group_of: Callable[[Any], Any] | None = None
    learning_rates: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def _groups(self, params) -> list[str]:
        groups = self.group_of(params) if self.group_of is not None else jax.tree.map(lambda _: "train", params)
        return jax.tree.structure(params).flatten_up_to(groups)

    def init(self, params) -> AdamWState:
        leaves, treedef = jax.tree.flatten(params)
        groups = self._groups(params)

        def zeros():  # a tree of its own per moment: donated buffers must be distinct
            return treedef.unflatten(
                [None if group == FROZEN else jnp.zeros_like(p) for p, group in zip(leaves, groups)]
            )

        return AdamWState(count=jnp.zeros((), jnp.int32), mu=zeros(), nu=zeros())

    def _rates(self, groups, count) -> dict[str, jax.Array]:
        """Minus each trained group's learning rate at step ``count``."""
        rates = {}
        for group in sorted(set(groups) - {FROZEN}):
            peak = self.learning_rates.get(group, self.cfg.learning_rate)
            rates[group] = -learning_rate_schedule(dataclasses.replace(self.cfg, learning_rate=peak))(count)
        return rates

    def step(self, params, state: AdamWState, grads, skip: jax.Array | None = None) -> tuple[Any, AdamWState]:
        """The new parameters and state, in the order of the arguments (donated to a jitted step,
        they are written in place). ``skip`` (a boolean scalar): if true, the old parameters and
        state, decided inside the same pass."""
        cfg = self.cfg
        treedef = jax.tree.structure(params)
        groups = self._groups(params)
        rates = self._rates(groups, state.count)
        t = state.count + 1
        update = dict(factor=clip_factor(grads, cfg.clip_norm), bias_corrections=(1 - cfg.b1**t, 1 - cfg.b2**t),
                      b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, skip=skip)  # fmt: skip
        new = []
        for p, g, mu, nu, group, decays in zip(
            treedef.flatten_up_to(params), treedef.flatten_up_to(grads), treedef.flatten_up_to(state.mu),
            treedef.flatten_up_to(state.nu), groups, treedef.flatten_up_to(weight_decay_mask(params)),
        ):  # fmt: skip
            if group == FROZEN:
                new.append((p, None, None))
            else:
                fused = cpu_adamw.adamw_update if cpu_adamw.serves(p) else adamw_update
                decay = cfg.weight_decay if decays else 0.0
                new.append(fused(p, g, mu, nu, **update, rate=rates[group], weight_decay=decay))
        params, mu, nu = (treedef.unflatten(list(column)) for column in zip(*new))
        return params, AdamWState(count=_unless(skip, t, state.count), mu=mu, nu=nu)


def make_optimizer(
    cfg: OptimizerConfig,
    group_of: Callable[[Any], Any] | None = None,
    learning_rates: Mapping[str, float] | None = None,
) -> AdamW:
    """The fused AdamW of ``cfg`` with parameter groups (see ``AdamW``)."""
    return AdamW(cfg, group_of, dict(learning_rates or {}))
