"""The optimizer: AdamW with linear warmup then polynomial (linear by default) decay, global-norm
clipping, weight decay only on matrices, parameter groups with their own peak learning rate, and
frozen groups that get no update and no optimizer state.

The update is fused, as torch's ``AdamW(fused=True)``: one elementwise computation per parameter
(clip factor times gradient, both moments, bias correction, decoupled weight decay) that writes the
new parameter and moments over the donated old ones. It computes what optax's
``chain(clip_by_global_norm, multi_transform({group: adamw(schedule, mask=weight_decay_mask)}))``
followed by ``params + updates`` computes, up to float32 rounding (tests/training/test_optim.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from rag_jax.config import OptimizerConfig
from rag_jax.training.sharding import path_str

# Parameter-name fragments that never get weight decay (biases and normalisation parameters), the
# usual `no_decay = ["bias", "LayerNorm.weight"]` of transformers' fine-tuning scripts.
NO_DECAY_FRAGMENTS = ("bias", "norm", "scale")
FROZEN = "frozen"  # the group that gets no update and no moments
# Elements per chunk when updating in chunks (see `update_in_chunks`): a chunk of the parameter, its
# gradient and both moments (1 MiB in float32) stays in a core's L2 cache between the three loops.
CHUNK_SIZE = 1 << 16


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
    """``min(1, max_norm / norm)``: ``optax.clip_by_global_norm`` as one scalar that multiplies the
    gradients inside the update (same result up to rounding; optax: ``g / norm * max_norm`` when
    clipping). 1 without clipping."""
    return 1.0 if max_norm is None else jnp.minimum(1.0, max_norm / global_norm(grads))


def weight_decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but biases and norm parameters."""

    def decays(path, _):
        names = path_str(path).lower().split("/")
        return not any(frag in name for name in names[-2:] for frag in NO_DECAY_FRAGMENTS)

    return jax.tree_util.tree_map_with_path(decays, params)


def chunk_size_for(devices) -> int | None:
    """``CHUNK_SIZE`` for parameters on one CPU device, else None. XLA:CPU fuses no computation with
    several outputs, so the update is done in chunks there (``update_in_chunks``); sharded
    parameters cannot be sliced in place, and GPU/TPU backends fuse sibling outputs themselves."""
    devices = list(devices)
    return CHUNK_SIZE if len(devices) == 1 and devices[0].platform == "cpu" else None


# -- one parameter ----------------------------------------------------------------------------------


def _unless(skip: jax.Array | None, new: jax.Array, old: jax.Array) -> jax.Array:
    return new if skip is None else jnp.where(skip, old, new)


def adam_moments(g, mu, nu, *, factor, b1: float, b2: float, skip=None):
    """The new first and second moments from the gradient ``g`` times the clip ``factor`` (optax's
    ``update_moment`` expressions); the old ones where ``skip``."""
    g = g * factor
    return _unless(skip, (1 - b1) * g + b1 * mu, mu), _unless(skip, (1 - b2) * (g * g) + b2 * nu, nu)


def adamw_param(p, mu, nu, *, rate, bias_corrections, eps: float, weight_decay: float, skip=None):
    """The new parameter from the new moments: ``p + rate * (mu_hat / (sqrt(nu_hat) + eps) + wd * p)``
    with ``rate`` the negative learning rate, the bias-corrected moments ``mu / (1 - b1^t)``,
    ``nu / (1 - b2^t)`` and no decay term when ``weight_decay`` is 0; ``p`` where ``skip``."""
    c1, c2 = bias_corrections
    update = (mu / c1) / (jnp.sqrt(nu / c2) + eps)
    if weight_decay:
        update = update + weight_decay * p
    return _unless(skip, p + rate * update, p)


def update_in_chunks(moments: Callable, param: Callable, p, g, mu, nu, size: int):
    """``mu, nu = moments(g, mu, nu); p = param(p, mu, nu)`` over ``size`` elements at a time, each
    chunk written in place. Unchunked, XLA:CPU computes the three outputs in three loops over the
    whole arrays, each reading its inputs from memory (10 passes where 7 suffice); here the second
    and third loops read the chunk from cache. The parameter reads the chunk's new moments back from
    the updated buffers, so no loop reads an old value that another overwrote (which would make XLA
    copy the buffer). The last chunk ends at the last element and leaves the ones before it that
    the previous chunk updated alone."""
    n = p.size
    flat_g = g.reshape(-1)

    def chunk(i, pmv):
        p, mu, nu = pmv
        start = jnp.minimum(i * size, n - size)
        fresh = start + jnp.arange(size) >= i * size

        def take(x):
            return lax.dynamic_slice(x, (start,), (size,))

        def put(x, new):
            return lax.dynamic_update_slice(x, jnp.where(fresh, new, take(x)), (start,))

        new_mu, new_nu = moments(take(flat_g), take(mu), take(nu))
        mu, nu = put(mu, new_mu), put(nu, new_nu)
        return put(p, param(take(p), take(mu), take(nu))), mu, nu

    flat = lax.fori_loop(0, -(-n // size), chunk, (p.reshape(-1), mu.reshape(-1), nu.reshape(-1)))
    return tuple(x.reshape(p.shape) for x in flat)


def update_parameter(moments: Callable, param: Callable, p, g, mu, nu, chunk_size: int | None = None):
    """The new ``(p, mu, nu)`` of one parameter: at once, or in chunks of ``chunk_size`` elements
    when it has more."""
    if chunk_size is not None and p.size > chunk_size:
        return update_in_chunks(moments, param, p, g, mu, nu, chunk_size)
    mu, nu = moments(g, mu, nu)
    return param(p, mu, nu), mu, nu


# -- the optimizer ----------------------------------------------------------------------------------


class AdamWState(NamedTuple):
    """The optimizer state, a pytree of arrays: the steps taken, and the first and second moments in
    the parameters' structure (None for frozen parameters)."""

    count: jax.Array
    mu: Any
    nu: Any


@dataclasses.dataclass(frozen=True)
class AdamW:
    """Global-norm clipping, then AdamW on ``cfg``'s schedule, fused into one pass per parameter.

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
        def moments():
            zeros = [None if group == FROZEN else jnp.zeros_like(p) for p, group in zip(leaves, groups)]
            return treedef.unflatten(zeros)

        leaves, treedef = jax.tree.flatten(params)
        groups = self._groups(params)
        return AdamWState(count=jnp.zeros((), jnp.int32), mu=moments(), nu=moments())

    def _rates(self, groups, count) -> dict[str, jax.Array]:
        """Minus each trained group's learning rate at step ``count``."""
        rates = {}
        for group in sorted(set(groups) - {FROZEN}):
            peak = self.learning_rates.get(group, self.cfg.learning_rate)
            rates[group] = -learning_rate_schedule(dataclasses.replace(self.cfg, learning_rate=peak))(count)
        return rates

    def step(self, params, state: AdamWState, grads, *, skip: jax.Array | None = None,
             chunk_size: int | None = None) -> tuple[Any, AdamWState]:  # fmt: skip
        """The new parameters and state, in the order of the arguments: donated to a jitted step, they
        are written in place. ``skip`` (a boolean scalar): if true, the old parameters and state,
        decided inside the same pass. ``chunk_size``: see ``chunk_size_for``."""
        cfg = self.cfg
        treedef = jax.tree.structure(params)
        groups = self._groups(params)
        rates = self._rates(groups, state.count)
        t = state.count + 1
        bias_corrections = (1 - cfg.b1**t, 1 - cfg.b2**t)
        moments = functools.partial(adam_moments, factor=clip_factor(grads, cfg.clip_norm), b1=cfg.b1, b2=cfg.b2,
                                    skip=skip)  # fmt: skip
        new = []
        for p, g, mu, nu, group, decays in zip(
            treedef.flatten_up_to(params), treedef.flatten_up_to(grads), treedef.flatten_up_to(state.mu),
            treedef.flatten_up_to(state.nu), groups, treedef.flatten_up_to(weight_decay_mask(params)),
        ):  # fmt: skip
            if group == FROZEN:
                new.append((p, None, None))
                continue
            param = functools.partial(adamw_param, rate=rates[group], bias_corrections=bias_corrections, eps=cfg.eps,
                                      weight_decay=cfg.weight_decay if decays else 0.0, skip=skip)  # fmt: skip
            new.append(update_parameter(moments, param, p, g, mu, nu, chunk_size))
        params, mu, nu = (treedef.unflatten(list(column)) for column in zip(*new))
        return params, AdamWState(count=_unless(skip, t, state.count), mu=mu, nu=nu)


def make_optimizer(
    cfg: OptimizerConfig,
    group_of: Callable[[Any], Any] | None = None,
    learning_rates: Mapping[str, float] | None = None,
) -> AdamW:
    """The fused AdamW of ``cfg`` with parameter groups (see ``AdamW``)."""
    return AdamW(cfg, group_of, dict(learning_rates or {}))
