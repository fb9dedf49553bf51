"""Which path BERT's and BART's attention takes: cuDNN's flash attention, ``jax.nn.dot_product_attention``'s
XLA implementation, or explicit einsums.

All compute ``softmax(scale * q . k, where mask else a huge negative) @ v`` with the scores and the
softmax in float32 (a fully masked row averages every value either way). ``jax.nn.dot_product_attention``
cannot drop attention probabilities, so the explicit path stays for training with attention dropout
(BERT's ``attention_probs_dropout_prob`` is 0.1; BART-large's ``attention_dropout`` is 0). Its XLA
implementation (what ``implementation=None`` runs in jax 0.10.2, on every backend) was slower than the
explicit einsums on XLA:CPU (1.4x for a BART-base self-attention forward + backward, 1.8x for a
beam-decoding cross-attention step; float32), so CPU keeps the explicit path (``EXPLICIT_BACKENDS``).

cuDNN's fused flash attention (``implementation="cudnn"``) takes a mask only as per-row key lengths
(and a causal flag), so it serves a ``KeyMask`` that carries its lengths: masks of right-padded rows
(every token before every pad), which the models build with ``padding_mask`` inside
``right_padded_masks()`` (the RAG loss composition sets it; its batches are checked with
``check_right_padded``), on a GPU, in bfloat16 / float16, with a head dimension cuDNN takes and even
query and key lengths (jax 0.10.2's cuDNN training path; the paper's 25-token targets keep the
decoder on XLA, its 300-token contexts put the encoders on cuDNN). Anything else
(float32, a left-padded or arbitrary mask, decoding against a cache) takes the XLA path. The platform
is the current mesh's (``jax.sharding.get_abstract_mesh``) where one is set, so a program compiled ahead
of time for GPU devices on a CPU host (``rag-jax plan``) takes the GPU's path.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

EXPLICIT_BACKENDS = ("cpu",)
"""Backends on which attention always takes the explicit einsums."""
FUSED_PLATFORMS = ("gpu", "cuda")
"""Platforms whose ``jax.nn.dot_product_attention`` can run cuDNN's flash attention."""
FUSED_DTYPES = (jnp.bfloat16, jnp.float16)
MAX_FUSED_HEAD_DIM = 128  # cuDNN: a multiple of 8, at most 128 (256 from Hopper on)

_right_padded: contextvars.ContextVar[bool] = contextvars.ContextVar("rag_jax_right_padded_masks", default=False)
_platform: contextvars.ContextVar[str | None] = contextvars.ContextVar("rag_jax_attention_platform", default=None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeyMask:
    """Which keys each query sees: ``keep`` (True: seen), broadcastable to ``[B, 1, T, S]``.

    ``lengths_B``, when set, says the same thing in cuDNN's form: query t sees key s iff s < length
    (and s <= t when ``causal``); a length of 0 is taken as 1 (such a row is padding: its output is not used).
    """

    keep_Bx1xTxS: jax.Array
    lengths_B: jax.Array | None = None
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))


@contextlib.contextmanager
def right_padded_masks() -> Iterator[None]:
    """Within this block (at trace time), the attention masks handed to the models are right-padded,
    so ``padding_mask`` gives them lengths and the fused kernel may serve them."""
    token = _right_padded.set(True)
    try:
        yield
    finally:
        _right_padded.reset(token)


def padding_mask(attention_mask_BxS: jax.Array, *, causal: bool = False) -> KeyMask:
    """The ``KeyMask`` of a ``[B, S]`` attention mask (1: token, 0: padding), optionally causal (then over
    S queries: each row's own tokens); with lengths inside ``right_padded_masks()``."""
    b, s = attention_mask_BxS.shape
    keep_Bx1x1xS = attention_mask_BxS.astype(bool)[:, None, None, :]
    keep_Bx1xTxS = (keep_Bx1x1xS & jnp.tril(jnp.ones((s, s), bool))[None, None]) if causal else keep_Bx1x1xS
    lengths_B = attention_mask_BxS.astype(jnp.int32).sum(-1) if _right_padded.get() else None
    return KeyMask(keep_Bx1xTxS, lengths_B, causal)


def check_right_padded(attention_mask: object, field: str) -> None:
    """A ``ValueError`` naming ``field`` where a host (numpy) attention mask has a token after a pad in
    some row (left padding); device arrays and tracers are not inspected."""
    if isinstance(attention_mask, np.ndarray) and attention_mask.ndim and attention_mask.shape[-1] > 1:
        if np.any(np.diff(attention_mask.astype(bool).astype(np.int8), axis=-1) > 0):
            raise ValueError(f"{field} has a token after padding in some row: masks must be right-padded "
                             "(a tokenizer with padding_side='right')")  # fmt: skip


@contextlib.contextmanager
def traced_for(platform_name: str) -> Iterator[None]:
    """Within this block attention is traced for ``platform_name`` ("cpu", "gpu", "tpu"), whatever the mesh
    and backend: for a program compiled ahead of time for other devices without a mesh set."""
    token = _platform.set(platform_name)
    try:
        yield
    finally:
        _platform.reset(token)


def platform() -> str:
    """The platform attention is traced for: ``traced_for``'s, else the current mesh's devices' where a
    mesh is set, else the default backend's."""
    if _platform.get() is not None:
        return _platform.get()
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def use_dot_product_attention(dropout_rate: float, key: jax.Array | None) -> bool:
    """Whether attention goes through ``jax.nn.dot_product_attention``: when no probability dropout
    applies (no ``key``, or a rate of 0) and the platform is not one of ``EXPLICIT_BACKENDS``
    (decided at trace time)."""
    return (key is None or dropout_rate == 0.0) and platform() not in EXPLICIT_BACKENDS


def fused_kernel_applies(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, mask: KeyMask) -> bool:
    """Whether cuDNN's flash attention serves these queries and keys under ``mask`` (see the module
    docstring; jax 0.10.2's cuDNN training path also wants even query and key lengths)."""
    (t, head_dim), s = q_BxTxHxK.shape[-3::2], k_BxSxHxK.shape[-3]
    return (mask.lengths_B is not None and platform() in FUSED_PLATFORMS and q_BxTxHxK.dtype in FUSED_DTYPES
            and head_dim % 8 == 0 and head_dim <= MAX_FUSED_HEAD_DIM and t % 2 == 0 and s % 2 == 0)  # fmt: skip


def dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask: KeyMask, *, scale: float) -> jax.Array:
    """``jax.nn.dot_product_attention`` under ``mask``: cuDNN's flash attention where it applies, XLA's
    implementation elsewhere."""
    if not fused_kernel_applies(q_BxTxHxK, k_BxSxHxK, mask):
        return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask.keep_Bx1xTxS, scale=scale)
    kv_lengths_B = jnp.maximum(mask.lengths_B, 1).astype(jnp.int32)
    q_lengths_B = jnp.full_like(kv_lengths_B, q_BxTxHxK.shape[1])  # every query row is real
    q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, q_lengths_B, kv_lengths_B = _batched_alike(
        q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, q_lengths_B, kv_lengths_B
    )
    return jax.nn.dot_product_attention(
        q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, scale=scale, is_causal=mask.causal, implementation="cudnn",
        query_seq_lengths=q_lengths_B, key_value_seq_lengths=kv_lengths_B,
    )  # fmt: skip


def _batched_alike(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """``arrays`` unchanged, each made to depend on all of them (plus a zero selected by one element of
    each), so that under ``jax.vmap`` all or none are batched: the cuDNN kernel's batching rule cannot take
    a mix (the generator's documents are a vmap axis, and e.g. the decoder's queries of its first layer do
    not depend on the document). The select folds away when compiled."""
    zero = sum(jnp.where(a.reshape(-1)[0] == 0, 0, 0) for a in arrays)
    return tuple(a + zero.astype(a.dtype) for a in arrays)
