"""A BERT encoder in pure JAX: a parameter pytree and a forward function, no flax.

Matches transformers' ``BertModel`` (post-LN, absolute positions, bidirectional attention) to float
rounding. Parameters are nested dicts of arrays; the transformer layers are stacked along a leading
layer axis and run with ``jax.lax.scan``, so compile time does not grow with depth and ``remat``
(a policy of ``rag_jax.models.remat``) checkpoints one layer at a time::

    embeddings:  word [V, D], position [P, D], token_type [T, D], norm {scale, bias} [D]
    layers:      query, key, value, attn_out {kernel [L, D, D], bias [L, D]}
                 mlp_in {kernel [L, D, F], bias [L, F]}, mlp_out {kernel [L, F, D], bias [L, D]}
                 attn_norm, mlp_norm {scale [L, D], bias [L, D]}
    pooler:      {kernel [D, D], bias [D]}   only when the checkpoint has one (BertModel's tanh
                 pooler); kept so exports round-trip, never used for pooling
    projection:  {kernel [D, P], bias [P]}   DPR's ``encode_proj``, only when projection_dim > 0

Kernels are stored [in, out] (transposed from torch's Linear). LayerNorm and softmax always run in
float32; ``compute_dtype`` sets the dtype of the matmuls and of the hidden states between them.

Each parameter's logical axes (``logical_axes``, for sharding) are declared where its shape and
initialiser are (``_layout``); the hidden states between layers are constrained to the "batch",
"length", "embed" layout when a mesh and axis rules are set (``rag_jax.models.partitioning``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from rag_jax.models.activations import activation
from rag_jax.models.attention import KeyMask, dot_product_attention, padding_mask, use_dot_product_attention
from rag_jax.models.configs import BertConfig
from rag_jax.models.dropout import dropout
from rag_jax.models.partitioning import HIDDEN, POSITION_TABLE, VOCAB_TABLE, LogicalAxes, constrain
from rag_jax.models.remat import rematerialised

Params = dict[str, Any]

# ----------------------------------------------------------------------------------------------
# Parameters


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """How ``init_params`` creates one parameter: its shape, the logical axes of its dimensions
    (``rag_jax.models.partitioning``) and its initialiser: "normal" (normal(0.02), from the next
    random key), "zeros" or "ones"."""

    shape: tuple[int, ...]
    axes: LogicalAxes
    init: str


def _stack(layers: int | None, shape: tuple[int, ...], axes: LogicalAxes, init: str) -> _Leaf:
    """A ``_Leaf``, with a leading "layers" axis of ``layers`` (stacked, scanned layers) unless None."""
    if layers is None:
        return _Leaf(shape, axes, init)
    return _Leaf((layers, *shape), ("layers", *axes), init)


def _dense(n_in: int, n_out: int, kernel_axes: LogicalAxes, bias_axis: str, layers: int | None = None) -> dict:
    """A linear layer: ``kernel [in, out]`` (normal) and ``bias [out]`` (zeros). Output biases of
    layers whose output is the hidden size stay replicated (``bias_axis`` "norm")."""
    return {
        "kernel": _stack(layers, (n_in, n_out), kernel_axes, "normal"),
        "bias": _stack(layers, (n_out,), (bias_axis,), "zeros"),
    }


def _norm(d: int, layers: int | None = None) -> dict:
    """A LayerNorm: ``scale [D]`` (ones) and ``bias [D]`` (zeros), replicated."""
    return {"scale": _stack(layers, (d,), ("norm",), "ones"), "bias": _stack(layers, (d,), ("norm",), "zeros")}


def _layout(cfg: BertConfig, pooler: bool) -> dict:
    """Every parameter as a ``_Leaf``, in the order ``init_params`` draws their random keys."""
    d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    layout = {
        "embeddings": {
            "word": _Leaf((cfg.vocab_size, d), ("vocab", "embed"), "normal"),
            "position": _Leaf((cfg.max_position_embeddings, d), ("norm", "embed"), "normal"),
            "token_type": _Leaf((cfg.type_vocab_size, d), ("norm", "embed"), "normal"),
            "norm": _norm(d),
        },
        "layers": {
            "query": _dense(d, d, ("embed", "heads"), "heads", n),
            "key": _dense(d, d, ("embed", "heads"), "heads", n),
            "value": _dense(d, d, ("embed", "heads"), "heads", n),
            "attn_out": _dense(d, d, ("heads", "embed"), "norm", n),
            "attn_norm": _norm(d, n),
            "mlp_in": _dense(d, f, ("embed", "mlp"), "mlp", n),
            "mlp_out": _dense(f, d, ("mlp", "embed"), "norm", n),
            "mlp_norm": _norm(d, n),
        },
    }
    if pooler:
        layout["pooler"] = _dense(d, d, ("embed", "norm"), "norm")
    if cfg.projection_dim > 0:
        layout["projection"] = _dense(d, cfg.projection_dim, ("embed", "norm"), "norm")
    return layout


def _build(make, layout: dict) -> dict:
    """``layout`` with ``make(leaf)`` for every ``_Leaf``, called in the layout's order."""
    return {name: _build(make, sub) if isinstance(sub, dict) else make(sub) for name, sub in layout.items()}


def init_params(cfg: BertConfig, key: jax.Array, dtype=jnp.float32, *, pooler: bool = False) -> Params:
    """Random parameters initialised like transformers (normal(0.02), zero biases, LN ones/zeros,
    zero padding embedding). ``pooler=True`` adds BertModel's (unused) tanh pooler."""
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads {cfg.num_attention_heads}"
        )
    keys = iter(jax.random.split(key, 12))

    def make(leaf: _Leaf) -> jax.Array:
        if leaf.init == "normal":
            return 0.02 * jax.random.normal(next(keys), leaf.shape, dtype)
        return (jnp.zeros if leaf.init == "zeros" else jnp.ones)(leaf.shape, dtype)

    params = _build(make, _layout(cfg, pooler))
    if 0 <= cfg.pad_token_id < cfg.vocab_size:
        params["embeddings"]["word"] = params["embeddings"]["word"].at[cfg.pad_token_id].set(0)
    return params


def logical_axes(cfg: BertConfig, *, pooler: bool = False) -> dict:
    """The logical axes of every parameter ``init_params(cfg, pooler=pooler)`` creates, in its structure
    (tuples of names, see ``rag_jax.models.partitioning``). Stacked layers lead with "layers"."""
    return _build(lambda leaf: leaf.axes, _layout(cfg, pooler))


def count_params(params: Params) -> int:
    """Number of scalars in a parameter pytree (also works on ``jax.eval_shape`` output)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------------------------
# Forward


def _lead(v: jax.Array, ndim: int) -> jax.Array:
    """``v`` with leading unit axes up to ``ndim`` (explicit, as rank promotion may be off)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def dense(x: jax.Array, p: Params, dtype) -> jax.Array:
    """``x @ kernel + bias`` in ``dtype``."""
    return x @ p["kernel"].astype(dtype) + _lead(p["bias"].astype(dtype), x.ndim)


def layer_norm(x: jax.Array, p: Params, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32 (returns float32)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    scale, bias = (_lead(p[name].astype(jnp.float32), x.ndim) for name in ("scale", "bias"))
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _explicit_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxK, keep_Bx1x1xS, rate: float, key) -> jax.Array:
    """Softmax attention with dropout on the probabilities (``rate``, when ``key`` is given); masked
    scores are the most negative float32, as transformers' additive mask makes them."""
    scores_BxHxSxS = jnp.einsum("bqhk,bshk->bhqs", q_BxSxHxK, k_BxSxHxK, preferred_element_type=jnp.float32)
    scores_BxHxSxS = jnp.where(keep_Bx1x1xS, scores_BxHxSxS * (q_BxSxHxK.shape[-1] ** -0.5), jnp.finfo(jnp.float32).min)
    probs_BxHxSxS = dropout(jax.nn.softmax(scores_BxHxSxS, axis=-1), rate, key)
    return jnp.einsum("bhqs,bshk->bqhk", probs_BxHxSxS.astype(v_BxSxHxK.dtype), v_BxSxHxK)


def _attention(x_BxSxD, p: Params, mask: KeyMask, cfg: BertConfig, dtype, key) -> jax.Array:
    b, s, _ = x_BxSxD.shape
    h, dh = cfg.num_attention_heads, cfg.head_dim
    q_BxSxHxK = dense(x_BxSxD, p["query"], dtype).reshape(b, s, h, dh)
    k_BxSxHxK = dense(x_BxSxD, p["key"], dtype).reshape(b, s, h, dh)
    v_BxSxHxK = dense(x_BxSxD, p["value"], dtype).reshape(b, s, h, dh)
    rate = cfg.attention_probs_dropout_prob  # 0.1 in BERT checkpoints: training takes the explicit path
    if use_dot_product_attention(rate, key):
        ctx_BxSxHxK = dot_product_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxK, mask, scale=dh**-0.5)
    else:
        ctx_BxSxHxK = _explicit_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxK, mask.keep_Bx1xTxS, rate, key)
    return ctx_BxSxHxK.reshape(b, s, h * dh)


def _layer(x_BxSxD, p: Params, key, mask: KeyMask, cfg: BertConfig, dtype) -> jax.Array:
    """One post-LN transformer layer (BertLayer)."""
    k_attn, k_attn_out, k_mlp_out = (None, None, None) if key is None else jax.random.split(key, 3)
    ctx_BxSxD = _attention(x_BxSxD, p, mask, cfg, dtype, k_attn)
    attn_BxSxD = dropout(dense(ctx_BxSxD, p["attn_out"], dtype), cfg.hidden_dropout_prob, k_attn_out)
    x_BxSxD = layer_norm(attn_BxSxD.astype(jnp.float32) + x_BxSxD, p["attn_norm"], cfg.layer_norm_eps).astype(dtype)
    mid_BxSxF = activation(cfg.hidden_act)(dense(x_BxSxD, p["mlp_in"], dtype))
    out_BxSxD = dropout(dense(mid_BxSxF, p["mlp_out"], dtype), cfg.hidden_dropout_prob, k_mlp_out)
    x_BxSxD = layer_norm(out_BxSxD.astype(jnp.float32) + x_BxSxD, p["mlp_norm"], cfg.layer_norm_eps).astype(dtype)
    return constrain(x_BxSxD, HIDDEN)


def embed(params: Params, input_ids_BxS, token_type_ids_BxS, *, cfg: BertConfig, dtype, key=None) -> jax.Array:
    """Word + token-type + position embeddings, LayerNorm, dropout (BertEmbeddings)."""
    s = input_ids_BxS.shape[1]
    if s > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {s} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    e = params["embeddings"]
    word_VxD, token_type_TxD, position_PxD = (
        constrain(e["word"], VOCAB_TABLE), constrain(e["token_type"], POSITION_TABLE),
        constrain(e["position"], POSITION_TABLE),
    )  # fmt: skip
    x_BxSxD = jnp.take(word_VxD, input_ids_BxS, axis=0).astype(jnp.float32)
    x_BxSxD = x_BxSxD + jnp.take(token_type_TxD, token_type_ids_BxS, axis=0).astype(jnp.float32)
    x_BxSxD = x_BxSxD + position_PxD[None, :s].astype(jnp.float32)
    x_BxSxD = layer_norm(x_BxSxD, e["norm"], cfg.layer_norm_eps).astype(dtype)
    return constrain(dropout(x_BxSxD, cfg.hidden_dropout_prob, key), HIDDEN)


def encode(
    params: Params,
    input_ids_BxS: jax.Array,
    attention_mask_BxS: jax.Array,
    token_type_ids_BxS: jax.Array | None = None,
    *,
    cfg: BertConfig,
    dropout_key: jax.Array | None = None,
    compute_dtype=None,
    remat: str = "none",
) -> jax.Array:
    """Last-layer hidden states [B, S, D] of BertModel.

    ``attention_mask_BxS`` is 1 for tokens and 0 for padding. Dropout (hidden and attention
    probabilities) is applied only when ``dropout_key`` is given. ``compute_dtype`` (default: the
    word embeddings' dtype) is the dtype of the matmuls and of the returned hidden states. ``remat``
    names the rematerialisation policy of each layer (``rag_jax.models.remat.REMAT_POLICIES``).
    """
    dtype = jnp.dtype(compute_dtype or params["embeddings"]["word"].dtype)
    if token_type_ids_BxS is None:
        token_type_ids_BxS = jnp.zeros_like(input_ids_BxS)
    emb_key, layer_keys = None, None
    if dropout_key is not None:
        emb_key, layers_key = jax.random.split(dropout_key)
        layer_keys = jax.random.split(layers_key, cfg.num_hidden_layers)

    x_BxSxD = embed(params, input_ids_BxS, token_type_ids_BxS, cfg=cfg, dtype=dtype, key=emb_key)
    mask = padding_mask(attention_mask_BxS)

    def body(x_BxSxD, layer):
        p, key = layer
        return _layer(x_BxSxD, p, key, mask, cfg, dtype), None

    x_BxSxD, _ = jax.lax.scan(rematerialised(body, remat), x_BxSxD, (params["layers"], layer_keys))
    return x_BxSxD
