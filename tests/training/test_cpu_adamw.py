"""The fused CPU AdamW kernel (rag_jax.training.cpu_adamw): the same numbers as XLA's form of the
update, in place, used where it applies and not elsewhere, and a clean fallback without a compiler.
Its agreement with optax's chain is tests/training/test_optim.py's (those steps run the kernel)."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rag_jax.training import cpu_adamw, optim
from rag_jax.training.optim import make_optimizer
from rag_jax.training.sharding import use_mesh
from tests.training.test_optim import CFG, RATES, group_of, random_tree

pytestmark = pytest.mark.skipif(not cpu_adamw.available(), reason="no C++ compiler on this host")


def moments(seed: int, shape=(300, 77)):
    rng = np.random.default_rng(seed)
    p, g, mu = (jnp.asarray(rng.normal(size=shape) * s, jnp.float32) for s in (1.0, 1.0, 0.1))
    return p, g, mu, jnp.asarray(np.abs(rng.normal(size=shape)), jnp.float32)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("skip", [None, False, True])
def test_kernel_equals_xla_update_bit_for_bit(weight_decay, skip):
    """The kernel computes XLA:CPU's update exactly: the same operations, the bias corrections as
    reciprocals and the multiply-adds contracted as XLA:CPU emits them (jax pinned, requirements.txt)."""

    def update(fn, count, factor, *operands):
        return fn(*operands, factor=factor, rate=jnp.float32(-1e-3), bias_corrections=(1 - 0.9**count, 1 - 0.999**count),
                  b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, skip=skip)  # fmt: skip

    operands = (jnp.int32(3), jnp.float32(0.3), *moments(0))
    xla = jax.jit(lambda *a: update(optim.adamw_update, *a))(*operands)
    kernel = jax.jit(lambda *a: update(cpu_adamw.adamw_update, *a))(*operands)
    for x, y in zip(xla, kernel, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    if skip:
        for x, y in zip(kernel, (operands[2], operands[4], operands[5])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_optimizer_step_runs_the_kernel_in_place():
    """A donated step on one CPU device calls the kernel once per trained parameter, writes over the
    donated buffers (no parameter-sized copy or temporary), and takes as many steps as XLA's form."""
    tx = make_optimizer(CFG, group_of, RATES)
    params = random_tree(0)
    state = tx.init(params)
    compiled = jax.jit(tx.step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    text = compiled.as_text()
    trained = sum(1 for x in jax.tree.leaves(state.mu) if x is not None)
    assert len(re.findall(rf'custom_call_target="{cpu_adamw.TARGET}"', text)) == trained
    assert not re.search(r"= f32\[\d[\d,]*\]\S* copy\(", text)
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes >= 3 * 4 * sum(x.size for x in jax.tree.leaves(state.mu) if x is not None)


def test_multi_device_mesh_and_accelerators_take_xla_form():
    """On a mesh of several devices the step keeps XLA's update (sharded operands stay sharded);
    so does a step traced for a TPU (``rag-jax plan``)."""
    params = {"w": jnp.ones((8, 16))}
    tx = make_optimizer(CFG)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
    sharded = jax.device_put(params, NamedSharding(mesh, P("data")))

    def step_on_mesh(*args):  # as the Trainer traces its step
        with use_mesh(mesh):
            return tx.step(*args)

    text = jax.jit(step_on_mesh).lower(sharded, tx.init(sharded), sharded).compile().as_text()
    assert cpu_adamw.TARGET not in text
    from rag_jax.models.attention import traced_for

    with traced_for("tpu"):
        assert not cpu_adamw.serves(params["w"])
    assert cpu_adamw.serves(params["w"]) and not cpu_adamw.serves(params["w"].astype(jnp.bfloat16))


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """A fresh ``available()`` decision with an empty kernel cache; restored afterwards."""
    monkeypatch.setenv("RAG_JAX_CACHE_DIR", str(tmp_path))
    cpu_adamw.available.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    cpu_adamw.available.cache_clear()


def test_builds_into_the_cache_once(fresh_kernel_state):
    assert cpu_adamw.available()  # built in the empty cache (the process's handler stays registered)
    (library,) = (fresh_kernel_state / "kernels").glob("adamw-*.so")
    built = library.stat().st_mtime_ns
    assert cpu_adamw.build(cpu_adamw._compiler()) == library and library.stat().st_mtime_ns == built


def test_without_a_compiler_warns_once_and_uses_xla(fresh_kernel_state, monkeypatch, caplog):
    monkeypatch.setenv("CXX", str(fresh_kernel_state / "no-such-compiler"))
    params = {"w": jnp.ones((4, 4))}
    tx = make_optimizer(CFG)
    with caplog.at_level(logging.WARNING, logger=cpu_adamw.__name__):
        text = jax.jit(tx.step).lower(params, tx.init(params), params).as_text()
        assert not cpu_adamw.available()
    assert cpu_adamw.TARGET not in text
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "XLA's update is used instead" in warning and "no-such-compiler" in warning
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu_adamw.adamw_update(*moments(1), factor=1.0, rate=-1e-3, bias_corrections=(0.1, 0.001), b1=0.9, b2=0.999,
                               eps=1e-8, weight_decay=0.0)  # fmt: skip


def test_switched_off_by_environment(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("RAG_JAX_CPU_KERNELS", "0")
    assert not cpu_adamw.available()
