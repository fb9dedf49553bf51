"""Dropout from 16-bit draws: the rate it applies, unbiasedness, keys, and sharding independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rag_jax.models.dropout import applied_rate, dropout, random_uint16


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_drops_at_the_applied_rate_and_keeps_the_expectation(rate):
    x = jnp.ones((256, 1001))  # odd last axis: one 32-bit draw is split across the row end
    y = np.asarray(dropout(x, rate, jax.random.key(0)))
    n = y.size
    dropped = float(np.mean(y == 0))
    assert abs(dropped - applied_rate(rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    assert abs(applied_rate(rate) - rate) <= 2**-17
    np.testing.assert_allclose(np.unique(y[y != 0]), [1 / (1 - applied_rate(rate))], rtol=1e-6)
    assert abs(float(np.mean(y)) - 1.0) < 5 * np.sqrt(rate / (1 - rate) / n)


def test_uniform_16_bit_numbers():
    u = np.asarray(random_uint16(jax.random.key(1), (100_000,)))
    assert u.dtype == np.uint16
    counts = np.bincount(u >> 12, minlength=16)  # 16 equal bins of the 16-bit range
    expected = len(u) / 16
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected))
    assert random_uint16(jax.random.key(1), ()).shape == ()


def test_keyed_reproducible_and_identity_without_key():
    x = jnp.arange(1.0, 65.0).reshape(8, 8)
    a, b, c = (dropout(x, 0.5, jax.random.key(s)) for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(dropout(x, 0.5, None), x)
    np.testing.assert_array_equal(dropout(x, 0.0, jax.random.key(3)), x)
    np.testing.assert_array_equal(dropout(x, 1.0, jax.random.key(3)), np.zeros_like(x))
    assert dropout(x.astype(jnp.bfloat16), 0.5, jax.random.key(3)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="dropout rate"):
        dropout(x, 1.5, jax.random.key(3))


def test_mask_does_not_depend_on_the_sharding():
    mesh = jax.make_mesh((8,), ("data",))
    x = jnp.ones((16, 40))
    key = jax.random.key(5)
    f = jax.jit(lambda x, key: dropout(x, 0.2, key))
    unsharded = f(x, key)
    sharded = f(jax.device_put(x, NamedSharding(mesh, P("data", None))), key)
    np.testing.assert_array_equal(sharded, unsharded)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_uniform_for_every_key_type(impl):
    u = np.asarray(random_uint16(jax.random.key(2, impl=impl), (50, 2001)))
    assert u.dtype == np.uint16 and u.shape == (50, 2001)
    counts = np.bincount((u >> 12).ravel(), minlength=16)
    assert np.all(np.abs(counts - u.size / 16) < 6 * np.sqrt(u.size / 16))
    # neighbouring elements are not correlated (the four numbers of one hash, and across rows)
    centred = u.astype(np.float64) - 32767.5
    for a, b in ((centred[:, :-1], centred[:, 1:]), (centred[:-1], centred[1:])):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01


def test_vmapped_keys_give_each_their_own_mask():  # as per_doc_logits draws one key per document
    keys = jax.random.split(jax.random.key(0), 3)
    x = jnp.ones((4, 10))
    batched = jax.jit(jax.vmap(lambda key: dropout(x, 0.5, key)))(keys)
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(batched[i], dropout(x, 0.5, key))
    assert not np.array_equal(batched[0], batched[1])
