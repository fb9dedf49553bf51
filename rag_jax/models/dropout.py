"""Inverted dropout from 16 random bits per element, shared by the BERT encoders and BART.

``jax.random.bernoulli`` spends one 32-bit draw per element, and with JAX's default partitionable
threefry every 32-bit draw costs a full threefry2x32 hash, whose 64 output bits are folded into 32.
Here a threefry key's hash of an element's position keeps all 64 bits, as four 16-bit numbers, so
a mask costs a quarter of the hashes (other key types: two 16-bit numbers per ``jax.random.bits``
32-bit draw). An element is dropped when its 16-bit number is below ``round(rate * 2**16)``, so the
dropout rate actually applied is that threshold / 2**16 (0.1 -> 0.1000061) and kept elements are
scaled by 1 / (1 - applied rate): the output's expectation is exactly ``x``. As in JAX's
partitionable scheme, the counter hashed is the element's position (row-major over the leading
axes, the last axis in groups of four), so masks are computed shard-locally under any sharding of
the leading axes. Measured in experiments/RESULTS.md (train-step benchmark).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

BITS = 16
LEVELS = 2**BITS


def applied_rate(rate: float) -> float:
    """The dropout probability ``dropout(x, rate, key)`` applies: ``rate`` rounded to a multiple of 2**-16."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"dropout rate must be in [0, 1], got {rate}")
    return round(rate * LEVELS) / LEVELS


def _threefry_uint16(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Four 16-bit numbers per threefry2x32 hash of the position ``(leading index, last index // 4)``."""
    *lead, last = shape
    groups_shape = (*lead, -(-last // 4))
    if math.prod(groups_shape) >= 2**32:
        raise ValueError(f"dropout mask of shape {shape} exceeds 2**32 counters")
    counter = jnp.zeros(groups_shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(groups_shape))):
        counter = counter + jax.lax.broadcasted_iota(jnp.uint32, groups_shape, axis) * jnp.uint32(stride)
        stride *= groups_shape[axis]
    k1, k2 = jax.random.key_data(key)
    bits1, bits2 = threefry2x32_p.bind(k1, k2, jnp.zeros_like(counter), counter)
    halves = jax.lax.bitcast_convert_type(jnp.stack([bits1, bits2], axis=-1), jnp.uint16)  # [..., G, 2, 2]
    return halves.reshape(*lead, -1)[..., :last]


def random_uint16(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform uint16 numbers of ``shape`` (see the module docstring)."""
    if not shape:
        return random_uint16(key, (1,))[0]
    if str(jax.random.key_impl(key)) == "threefry2x32":
        return _threefry_uint16(key, shape)
    *lead, last = shape
    words = jax.random.bits(key, (*lead, -(-last // 2)), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16)  # [..., (last + 1) // 2, 2]
    return halves.reshape(*lead, -1)[..., :last]


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Zero each element of ``x`` with probability ``applied_rate(rate)`` and scale the rest by
    ``1 / (1 - applied_rate(rate))``; the identity when ``key`` is None (deterministic) or the rate is 0."""
    p = applied_rate(rate)
    if key is None or p == 0.0:
        return x
    if p == 1.0:
        return jnp.zeros_like(x)
    keep = random_uint16(key, x.shape) >= jnp.uint16(round(p * LEVELS))
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - p), x.dtype), jnp.zeros((), x.dtype))
