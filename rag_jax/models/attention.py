"""Which path BERT's and BART's attention takes: ``jax.nn.dot_product_attention`` or explicit einsums.

Both compute ``softmax(scale * q . k, where mask else a huge negative) @ v`` with the scores and the
softmax in float32 (a fully masked row averages every value either way). ``jax.nn.dot_product_attention``
is the call a fused kernel can serve (cuDNN flash attention on GPU), but it cannot drop attention
probabilities, so the explicit path stays for training with attention dropout (BERT's
``attention_probs_dropout_prob`` is 0.1; BART-large's ``attention_dropout`` is 0). Its XLA implementation
(what ``implementation=None`` runs in jax 0.10.2, on every backend) was slower than the explicit
einsums on XLA:CPU (1.4x for a BART-base self-attention forward + backward, 1.8x for a beam-decoding
cross-attention step; float32), so CPU keeps the explicit path (``EXPLICIT_BACKENDS``).
"""

from __future__ import annotations

import jax

EXPLICIT_BACKENDS = ("cpu",)
"""Backends on which attention always takes the explicit einsums."""


def use_dot_product_attention(dropout_rate: float, key: jax.Array | None) -> bool:
    """Whether attention goes through ``jax.nn.dot_product_attention``: when no probability dropout
    applies (no ``key``, or a rate of 0) and the default backend is not one of ``EXPLICIT_BACKENDS``
    (decided at trace time)."""
    return (key is None or dropout_rate == 0.0) and jax.default_backend() not in EXPLICIT_BACKENDS
