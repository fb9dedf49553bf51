"""Inverted dropout from 16 random bits per element, shared by the BERT encoders and BART.

``jax.random.bernoulli`` spends one 32-bit draw per element, and with JAX's default partitionable
threefry every 32-bit draw costs a full threefry2x32 hash. Here each 32-bit draw is split into two
16-bit numbers, so a mask costs half the hashes (on a 2-core CPU the tiny benchmark train step,
dropout 0.1 everywhere, went from 0.043 to 0.039 s; experiments/RESULTS.md). An element is dropped
when its 16-bit number is below ``round(rate * 2**16)``, so the dropout rate actually applied is
that threshold / 2**16 (0.1 -> 0.1000061) and kept elements are scaled by 1 / (1 - applied rate):
the output's expectation is exactly ``x``. The mask depends only on the key and the element's
position, as with ``jax.random.bits``, so it is the same under any sharding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BITS = 16
LEVELS = 2**BITS


def applied_rate(rate: float) -> float:
    """The dropout probability ``dropout(x, rate, key)`` applies: ``rate`` rounded to a multiple of 2**-16."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"dropout rate must be in [0, 1], got {rate}")
    return round(rate * LEVELS) / LEVELS


def random_uint16(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform uint16 numbers of ``shape``, two from every 32-bit draw of ``jax.random.bits``."""
    if not shape:
        return random_uint16(key, (1,))[0]
    *lead, last = shape
    words = jax.random.bits(key, (*lead, (last + 1) // 2), jnp.uint32)
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
