"""The fused AdamW against optax's chain (clipping, per-group AdamW with a weight-decay mask, frozen
group), skipped steps, in-place updates, and the state's layout."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rag_jax.config import OptimizerConfig, default_config, resolve
from rag_jax.training import optim
from rag_jax.training.optim import AdamWState, learning_rate_schedule, make_optimizer, weight_decay_mask

CFG = dataclasses.replace(resolve(default_config()).train.optimizer, learning_rate=1e-2, warmup_steps=2, total_steps=6,
                          end_learning_rate=1e-3, weight_decay=0.1)  # fmt: skip
RATES = {"query_encoder": 3e-3}
SHAPES = {
    "query_encoder": {"dense": {"kernel": (5, 3), "bias": (3,)}},
    "generator": {"layer": {"kernel": (4, 6), "norm": {"scale": (6,)}}, "embed": (9, 5)},
    "doc_encoder": {"kernel": (3, 4)},
}


def group_of(params):
    group = {"query_encoder": "query_encoder", "generator": "train", "doc_encoder": "frozen"}
    return {name: jax.tree.map(lambda _, g=group[name]: g, tree) for name, tree in params.items()}


def random_tree(seed: int, scale: float = 1.0):
    leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    rng = np.random.default_rng(seed)
    return treedef.unflatten([jnp.asarray(scale * rng.normal(size=s), jnp.float32) for s in leaves])


def optax_reference(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """The optax chain the fused AdamW replaces: optax's global-norm clipping, then AdamW per group
    (its own peak learning rate, same schedule; weight decay on matrices), nothing for "frozen"."""

    def adamw(rate: float) -> optax.GradientTransformation:
        schedule = learning_rate_schedule(dataclasses.replace(cfg, learning_rate=rate))
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=weight_decay_mask)  # fmt: skip

    groups = {"train": adamw(cfg.learning_rate), "frozen": optax.set_to_zero()}
    groups.update({name: adamw(rate) for name, rate in RATES.items()})
    clip = [] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm)]
    return optax.chain(*clip, optax.multi_transform(groups, group_of))


def run_fused(cfg, grads_per_step):
    tx = make_optimizer(cfg, group_of, RATES)
    step = jax.jit(tx.step, donate_argnums=(0, 1))
    params = random_tree(0)
    state = tx.init(params)
    for grads in grads_per_step:
        params, state = step(params, state, grads)
    return params, state


def run_optax(cfg, grads_per_step):
    tx = optax_reference(cfg)
    params = random_tree(0)
    state = tx.init(params)
    for grads in grads_per_step:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


# The gradients' global norm is about 10: clip 0.5 clips every step, 1e3 never.
@pytest.mark.parametrize("clip_norm", [0.5, 1e3, None])
def test_fused_adamw_equals_optax_chain(clip_norm):
    cfg = dataclasses.replace(CFG, clip_norm=clip_norm)
    grads = [random_tree(seed) for seed in range(1, 6)]  # warmup, peak, decay, end, held at the end
    params, state = run_fused(cfg, grads)
    ref_params, ref_state = run_optax(cfg, grads)
    assert_trees_close(params, ref_params, rtol=2e-6, atol=1e-7)
    adam = ref_state[-1].inner_states["train"].inner_state[0]  # the generator's group
    assert int(state.count) == int(adam.count) == len(grads)
    assert_trees_close(state.mu["generator"], adam.mu["generator"], rtol=2e-6, atol=1e-9)
    assert_trees_close(state.nu["generator"], adam.nu["generator"], rtol=2e-6, atol=1e-12)
    qe = ref_state[-1].inner_states["query_encoder"].inner_state[0]
    assert_trees_close(state.mu["query_encoder"], qe.mu["query_encoder"], rtol=2e-6, atol=1e-9)


def test_frozen_parameters_get_no_update_and_no_moments():
    params, state = run_fused(CFG, [random_tree(seed) for seed in range(1, 4)])
    assert_trees_close(params["doc_encoder"], random_tree(0)["doc_encoder"], rtol=0, atol=0)
    assert state.mu["doc_encoder"] == {"kernel": None} and state.nu["doc_encoder"] == {"kernel": None}
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))  # orbax saves it as is


def test_skipped_step_keeps_parameters_and_state():
    tx = make_optimizer(CFG, group_of, RATES)
    params, state = run_fused(CFG, [random_tree(1)])
    step = jax.jit(tx.step)
    for skip, changed in ((True, False), (False, True)):
        new_params, new_state = step(params, state, random_tree(2), skip=jnp.asarray(skip))
        pairs = zip(jax.tree.leaves((params, state)), jax.tree.leaves((new_params, new_state)))
        assert all(np.array_equal(a, b) for a, b in pairs) != changed


def test_weight_decay_only_on_matrices():
    mask = weight_decay_mask(random_tree(0))
    assert mask["generator"] == {"layer": {"kernel": True, "norm": {"scale": False}}, "embed": True}
    assert mask["query_encoder"]["dense"] == {"kernel": True, "bias": False}


def test_donated_step_updates_in_place():
    """Donated, the new parameters and moments are written over the old ones (XLA aliases every
    output array to a donated input) and no parameter-sized temporary buffer or copy is needed."""
    params = {"w": jnp.ones((256, 384)), "b": jnp.ones(384)}
    tx = make_optimizer(CFG)
    compiled = jax.jit(tx.step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes >= 3 * sum(x.nbytes for x in params.values())
    assert memory.temp_size_in_bytes < params["w"].nbytes // 8
    assert not re.search(r"= f32\[\d[\d,]*\]\S* copy\(", compiled.as_text())  # scalars only


def test_clip_factor_equals_optax_clipping():
    grads = random_tree(1)
    for max_norm in (0.1, 1e3):
        clipped = jax.tree.map(functools.partial(jnp.multiply, optim.clip_factor(grads, max_norm)), grads)
        ref, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        assert_trees_close(clipped, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(optim.global_norm(grads), optax.tree.norm(grads), rtol=1e-6)
    assert isinstance(make_optimizer(CFG).init(grads), AdamWState)
