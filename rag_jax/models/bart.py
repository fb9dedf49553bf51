"""BART for conditional generation in flax.nnx, equal to transformers' ``BartForConditionalGeneration``.

The module tree mirrors the transformers one (``shared``, ``encoder.layers.self_attn.q_proj``, ...), except
that each stack's layers are one module whose variables carry a leading layer axis (created with
``nnx.vmap``; ``encoder.layers.fc1.kernel`` is ``[L, D, F]``), run with ``jax.lax.scan``, so compile time
does not grow with depth and ``remat`` (a policy of ``rag_jax.models.remat``) checkpoints one layer at a
time. The checkpoint conversion in ``rag_jax.hf.bart`` is a renaming rule plus that stacking.
``cfg.normalize_before`` selects the mBART layout: pre-LN layers and a final ``layer_norm`` after each stack.

Mixed precision: parameters are kept in ``param_dtype``; with ``dtype=jnp.bfloat16`` the matmuls run in
bfloat16 while the residual stream, the layer norms, the attention softmax and the logits stay float32.

Incremental decoding uses an explicit, functional ``DecodeCache`` (see ``Bart.init_cache``): ``decode``
takes a cache and returns the updated one, so it works under ``jax.jit`` and ``jax.lax.while_loop``. Its
keys and values are stacked over the decoder layers too (layer axis first), scanned with the layers.

Every parameter declares its logical axes where it is created (``out_sharding`` metadata of its
``nnx.Param``; the stacking adds a leading "layers" axis); ``param_logical_axes`` reads them. The hidden
states between layers and the logits are constrained to their logical layout when a mesh and axis rules
are set (``rag_jax.models.partitioning``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from rag_jax.models.activations import ACTIVATIONS
from rag_jax.models.attention import KeyMask, dot_product_attention, padding_mask, platform, use_dot_product_attention
from rag_jax.models.configs import BartConfig
from rag_jax.models.dropout import dropout
from rag_jax.models.partitioning import HIDDEN, LOGITS, POSITION_TABLE, VOCAB_TABLE, LogicalAxes, constrain
from rag_jax.models.remat import check_remat, rematerialised

POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding: position p is row p + 2
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, used by every BART layer norm
_MASKED = float(jnp.finfo(jnp.float32).min)


class Buffer(nnx.Variable):
    """A non-trainable array stored with the weights (a registered buffer in torch).

    It is not an ``nnx.Param``, so optimizers built on ``nnx.Param`` leave it alone.
    """


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
    """The decoder state between incremental ``Bart.decode`` calls: every decoder layer's attention keys
    and values, heads split, stacked on a leading layer axis L (the scanned decoder reads and writes one
    layer per step), so the rows are axis 1 of the keys/values.

    ``self_*`` hold ``max_length`` slots of which the first ``index`` are written, for the B decoder rows.
    ``cross_*`` are the encoder output projected once by each layer's cross-attention, for C encoder rows,
    with B a multiple of C: each run of G = B / C consecutive decoder rows (e.g. the beams of one input)
    reads one encoder row, shared, not copied. ``encoder_mask_CxS`` is the encoder attention mask used
    by the cross-attention. ``index_B`` is the number of tokens already decoded, one int32 per row; all
    rows advance together, and ``index + T`` must stay ``<= max_length``. Beams are reordered (or rows
    repeated) with ``take_decoder_rows``; where C = B, the cross-attention state and the encoder mask
    can be gathered too (on the same axes).
    """

    self_k_LxBxHxMxK: jax.Array
    self_v_LxBxHxMxK: jax.Array
    cross_k_LxCxHxSxK: jax.Array
    cross_v_LxCxHxSxK: jax.Array
    encoder_mask_CxS: jax.Array
    index_B: jax.Array

    @property
    def max_length(self) -> int:
        return self.self_k_LxBxHxMxK.shape[3]


def with_decoder_rows(cache: DecodeCache, rows_per_input: int, max_length: int) -> DecodeCache:
    """``cache``'s cross-attention state with an empty self-attention state of ``max_length`` slots for
    ``rows_per_input`` decoder rows per encoder row: rows ``c * rows_per_input .. (c + 1) * rows_per_input - 1``
    cross-attend to encoder row c, whose keys/values are shared, not copied (the attention reads them
    once for the whole run of rows)."""
    rows = cache.encoder_mask_CxS.shape[0] * rows_per_input
    layers, _, h, _, d = cache.cross_k_LxCxHxSxK.shape
    zeros_LxRxHxMxK = jnp.zeros((layers, rows, h, max_length, d), cache.self_k_LxBxHxMxK.dtype)
    return dataclasses.replace(
        cache, self_k_LxBxHxMxK=zeros_LxRxHxMxK, self_v_LxBxHxMxK=zeros_LxRxHxMxK, index_B=jnp.zeros((rows,), jnp.int32)
    )


def take_decoder_rows(cache: DecodeCache, source_GxN: jax.Array) -> DecodeCache:
    """Decoder rows in G consecutive groups of N: row ``(g, n)`` continues the self-attention state of
    row ``(g, source[g, n])`` (beams reordered, rows repeated; one group, G = 1, reorders rows freely).
    The gather is batched over the groups, so with the rows split over devices by group no device reads
    another's keys/values (a gather by global row numbers made GSPMD all-gather the cache). The
    cross-attention state does not move, so a group must not span rows of different encoder rows where
    C < B."""
    groups, n = source_GxN.shape

    def within_groups(x_LxBx___: jax.Array) -> jax.Array:
        layers, rows, *rest = x_LxBx___.shape
        x_LxGxNx___ = x_LxBx___.reshape(layers, groups, n, *rest)
        index = source_GxN.reshape(1, groups, n, *([1] * len(rest)))
        return jnp.take_along_axis(x_LxGxNx___, index, axis=2).reshape(x_LxBx___.shape)

    self_k, self_v = within_groups(cache.self_k_LxBxHxMxK), within_groups(cache.self_v_LxBxHxMxK)
    index_B = within_groups(cache.index_B[None])[0]
    return dataclasses.replace(cache, self_k_LxBxHxMxK=self_k, self_v_LxBxHxMxK=self_v, index_B=index_B)


def _dropout_keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` independent dropout keys from ``key``; ``None`` everywhere when dropout is off."""
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


def _embedding_and_layer_keys(key: jax.Array | None, layers: int) -> tuple[jax.Array | None, jax.Array | None]:
    """A dropout key for a stack's embeddings and ``[L]`` keys, one per layer (scanned with the layers);
    ``None`` for both when dropout is off."""
    if key is None:
        return None, None
    embedding_key, layers_key = jax.random.split(key)
    return embedding_key, jax.random.split(layers_key, layers)


def _draw_key(deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array | None:
    if deterministic:
        return None
    if rngs is None:
        raise ValueError("deterministic=False needs rngs with a 'dropout' stream, e.g. nnx.Rngs(dropout=0)")
    return rngs.dropout()


def _token_embedding_init(std: float, pad_token_id: int):
    """Normal(std) rows with the padding row zeroed, as torch initialises an ``Embedding(padding_idx=)``."""

    def init(key, shape, dtype):
        return nnx.initializers.normal(std)(key, shape, dtype).at[pad_token_id].set(0)

    return init


def _axes(*names: str) -> dict:
    """``nnx.Param`` metadata declaring the logical axes of its dimensions. They only name the axes: the
    parameter is not placed on a mesh when created (``eager_sharding`` off), a run lays it out."""
    return {"out_sharding": names, "eager_sharding": False}


def _lookup(embed: nnx.Embed, ids: jax.Array, table_axes: LogicalAxes) -> jax.Array:
    """``embed(ids)``, reading the table laid out as ``table_axes`` (``rag_jax.models.partitioning``)."""
    return jnp.take(constrain(embed.embedding[...], table_axes), ids, axis=0)


def _linear(in_features: int, out_features: int, cfg: BartConfig, kernel_axes: LogicalAxes, bias_axis: str, *,
            rngs: nnx.Rngs, dtype, param_dtype):  # fmt: skip
    """A linear layer initialised as transformers initialises BART's: normal(init_std) weights, zero bias;
    its kernel ``[in, out]`` has ``kernel_axes``, its bias ``bias_axis`` ("norm", replicated, for the
    biases added to the hidden states)."""
    return nnx.Linear(
        in_features,
        out_features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(cfg.init_std),
        kernel_metadata=_axes(*kernel_axes),
        bias_metadata=_axes(bias_axis),
        rngs=rngs,
    )


def _layer_norm(d_model: int, *, rngs: nnx.Rngs, param_dtype) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        d_model, epsilon=LAYER_NORM_EPS, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False,
        scale_metadata=_axes("norm"), bias_metadata=_axes("norm"), rngs=rngs,
    )  # fmt: skip


def _explicit_attention(q_CxQxHxK, k_CxHxSxK, v_CxHxSxK, mask_Cx1xQxS, rate: float, key) -> jax.Array:
    """Softmax attention ``[C, Q, H, Dh]`` with dropout on the probabilities (``rate``, when ``key`` is
    given); masked scores are the most negative float32."""
    q_CxHxQxK = q_CxQxHxK.transpose(0, 2, 1, 3)
    scores_CxHxQxS = jnp.einsum("chqk,chsk->chqs", q_CxHxQxK, k_CxHxSxK, preferred_element_type=jnp.float32)
    scores_CxHxQxS = jnp.where(mask_Cx1xQxS, scores_CxHxQxS, _MASKED)
    probs_CxHxQxS = dropout(jax.nn.softmax(scores_CxHxQxS, axis=-1), rate, key)
    # heads stay a batch axis of the product (XLA:CPU runs a dot whose output moves them much slower)
    out_CxHxQxK = jnp.einsum("chqs,chsk->chqk", probs_CxHxQxS.astype(v_CxHxSxK.dtype), v_CxHxSxK)
    return out_CxHxQxK.transpose(0, 2, 1, 3)


class Attention(nnx.Module):
    """Multi-head attention (``BartAttention``): q/k/v/out projections, queries scaled by ``Dh**-0.5``."""

    def __init__(self, cfg: BartConfig, num_heads: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.d_model
        if d % num_heads:
            raise ValueError(f"d_model={d} is not divisible by the number of heads {num_heads}")
        linear = functools.partial(_linear, d, d, cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = linear(("embed", "heads"), "heads")
        self.k_proj = linear(("embed", "heads"), "heads")
        self.v_proj = linear(("embed", "heads"), "heads")
        self.out_proj = linear(("heads", "embed"), "norm")
        self.num_heads = num_heads
        self.head_dim = d // num_heads
        self.dropout_rate = cfg.attention_dropout

    def _split_heads(self, x_BxLxD: jax.Array) -> jax.Array:
        b, length, _ = x_BxLxD.shape
        return x_BxLxD.reshape(b, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def project_kv(self, x_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of ``x``, heads split: two ``[B, H, S, Dh]``."""
        return self._split_heads(self.k_proj(x_BxSxD)), self._split_heads(self.v_proj(x_BxSxD))

    def __call__(self, x_BxTxD, k_CxHxSxK, v_CxHxSxK, mask: KeyMask, *, key: jax.Array | None,
                 over_cache: bool = False) -> jax.Array:
        """Attend from ``x`` to the given keys/values where ``mask`` is True; ``key`` drives the dropout.

        The keys, values and mask may have ``C = B / G`` rows: then each run of G consecutive rows of
        ``x`` (the beams of one document) attends to one row of them, as G * T queries of that row, so
        shared keys/values are neither copied nor read G times (the mask's T axis must then be 1).
        The product runs in ``jax.nn.dot_product_attention`` where ``rag_jax.models.attention`` allows it,
        except ``over_cache`` (decoding steps against a ``DecodeCache``): those take the explicit einsums on
        every backend (XLA's implementation is the same einsums there, and with it XLA:GPU rejects the
        batch-sharded decoding loop, a scatter-bounds error in jax 0.10.2, found by ``rag-jax plan``).
        """
        b, t = x_BxTxD.shape[:2]
        c, h, _, dh = k_CxHxSxK.shape
        if b % c:
            raise ValueError(f"{b} query rows cannot share {c} rows of keys/values (not a multiple)")
        q_BxTxHxK = self.q_proj(x_BxTxD).reshape(b, t, h, dh)
        q_BxTxHxK = (q_BxTxHxK * jnp.asarray(dh**-0.5, q_BxTxHxK.dtype)).astype(k_CxHxSxK.dtype)
        q_CxQxHxK = q_BxTxHxK.reshape(c, -1, h, dh)  # a run of G rows of T queries: G * T queries
        # scale 1: the queries are scaled, as in transformers
        if not over_cache and use_dot_product_attention(self.dropout_rate, key):
            k_CxSxHxK, v_CxSxHxK = k_CxHxSxK.transpose(0, 2, 1, 3), v_CxHxSxK.transpose(0, 2, 1, 3)
            out_CxQxHxK = dot_product_attention(q_CxQxHxK, k_CxSxHxK, v_CxSxHxK, mask, scale=1.0)
        else:
            out_CxQxHxK = _explicit_attention(q_CxQxHxK, k_CxHxSxK, v_CxHxSxK, mask.keep_Bx1xTxS, self.dropout_rate, key)
        return self.out_proj(out_CxQxHxK.reshape(b, t, h * dh))


class _Layer(nnx.Module):
    """What encoder and decoder layers share: the feed-forward block and the residual wiring.

    A sub-block reads ``_block_input(norm, h)`` and its output is merged by ``_block_output``: BART
    (post-LN) computes ``norm(h + drop(block(h)))``, mBART (pre-LN) ``h + drop(block(norm(h)))``.
    """

    def __init__(self, cfg: BartConfig, ffn_dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.fc1 = _linear(cfg.d_model, ffn_dim, cfg, ("embed", "mlp"), "mlp", rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)  # fmt: skip
        self.fc2 = _linear(ffn_dim, cfg.d_model, cfg, ("mlp", "embed"), "norm", rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)  # fmt: skip
        self.final_layer_norm = _layer_norm(cfg.d_model, rngs=rngs, param_dtype=param_dtype)
        self.activation = cfg.activation_function
        self.normalize_before = cfg.normalize_before
        self.dropout_rate = cfg.dropout
        self.activation_dropout_rate = cfg.activation_dropout

    def _block_input(self, norm: nnx.LayerNorm, h_BxTxD) -> jax.Array:
        return norm(h_BxTxD) if self.normalize_before else h_BxTxD

    def _block_output(self, norm: nnx.LayerNorm, h_BxTxD, out_BxTxD, key) -> jax.Array:
        h_BxTxD = h_BxTxD + dropout(out_BxTxD, self.dropout_rate, key)
        return h_BxTxD if self.normalize_before else norm(h_BxTxD)

    def _feed_forward(self, h_BxTxD, keys) -> jax.Array:
        x_BxTxD = self._block_input(self.final_layer_norm, h_BxTxD)
        a_BxTxF = ACTIVATIONS[self.activation](self.fc1(x_BxTxD))
        out_BxTxD = self.fc2(dropout(a_BxTxF, self.activation_dropout_rate, keys[0]))
        return constrain(self._block_output(self.final_layer_norm, h_BxTxD, out_BxTxD, keys[1]), HIDDEN)


class EncoderLayer(_Layer):
    """``BartEncoderLayer``: self-attention then feed-forward."""

    def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        super().__init__(cfg, cfg.encoder_ffn_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, cfg.encoder_attention_heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn_layer_norm = _layer_norm(cfg.d_model, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, h_BxSxD, mask: KeyMask, key) -> jax.Array:
        keys = _dropout_keys(key, 4)
        x_BxSxD = self._block_input(self.self_attn_layer_norm, h_BxSxD)
        out_BxSxD = self.self_attn(x_BxSxD, *self.self_attn.project_kv(x_BxSxD), mask, key=keys[0])
        h_BxSxD = self._block_output(self.self_attn_layer_norm, h_BxSxD, out_BxSxD, keys[1])
        return self._feed_forward(h_BxSxD, keys[2:])


class DecoderLayer(_Layer):
    """``BartDecoderLayer``: causal self-attention, cross-attention to the encoder, feed-forward."""

    def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        super().__init__(cfg, cfg.decoder_ffn_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        heads = cfg.decoder_attention_heads
        self.self_attn = Attention(cfg, heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn_layer_norm = _layer_norm(cfg.d_model, rngs=rngs, param_dtype=param_dtype)
        self.encoder_attn = Attention(cfg, heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.encoder_attn_layer_norm = _layer_norm(cfg.d_model, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, h_BxTxD, self_mask: KeyMask, cross_kv, cross_mask: KeyMask, self_kv, index_B, key):
        """One layer. With ``self_kv`` (this layer's cached ``[B, H, M, Dh]`` keys/values), this step's
        keys/values are written at ``index_B`` and attention runs over the cache; without, over ``h`` itself.

        Returns the new hidden states and this step's self-attention keys/values ``[B, H, T, Dh]``.
        """
        keys = _dropout_keys(key, 6)
        x_BxTxD = self._block_input(self.self_attn_layer_norm, h_BxTxD)
        new_kv = self.self_attn.project_kv(x_BxTxD)
        k_BxHxLxK, v_BxHxLxK = new_kv
        if self_kv is not None:
            k_BxHxLxK, v_BxHxLxK = _write_at(self_kv[0], k_BxHxLxK, index_B), _write_at(self_kv[1], v_BxHxLxK, index_B)
        out_BxTxD = self.self_attn(x_BxTxD, k_BxHxLxK, v_BxHxLxK, self_mask, key=keys[0], over_cache=self_kv is not None)
        h_BxTxD = self._block_output(self.self_attn_layer_norm, h_BxTxD, out_BxTxD, keys[1])

        x_BxTxD = self._block_input(self.encoder_attn_layer_norm, h_BxTxD)
        out_BxTxD = self.encoder_attn(x_BxTxD, *cross_kv, cross_mask, key=keys[2], over_cache=self_kv is not None)
        h_BxTxD = self._block_output(self.encoder_attn_layer_norm, h_BxTxD, out_BxTxD, keys[3])
        return self._feed_forward(h_BxTxD, keys[4:]), new_kv


def _write_at(buf_BxHxMxK: jax.Array, new_BxHxTxK: jax.Array, index_B: jax.Array) -> jax.Array:
    """Write each row's new keys/values into its cache slots ``[index, index + T)``."""

    def write_row(buf_HxMxK, new_HxTxK, index):
        return jax.lax.dynamic_update_slice(buf_HxMxK, new_HxTxK.astype(buf_HxMxK.dtype), (0, index, 0))

    return jax.vmap(write_row)(buf_BxHxMxK, new_BxHxTxK, index_B)


_write_at_every_layer = jax.vmap(_write_at, in_axes=(0, 0, None))
"""``_write_at`` for stacked ``[L, B, H, M, Dh]`` caches and ``[L, B, H, T, Dh]`` new keys/values."""


def _stacked_layers(make_layer, layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """``layers`` layers ``make_layer(rngs)`` as one module whose variables have a leading layer axis,
    each layer initialised from its own split of ``rngs`` (flax's scan-over-layers recipe); the layer axis
    is named "layers" in the variables' logical axes."""

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return make_layer(rngs)

    return make(rngs)


class _Stack(nnx.Module):
    """An encoder or decoder stack: ``num_layers`` layers ``make_layer(rngs)``, stacked (see
    ``_stacked_layers``), the parts around them (positions, embedding norm, final norm) and the scan over
    the layers."""

    def __init__(self, cfg: BartConfig, make_layer, num_layers: int, *, rngs: nnx.Rngs, param_dtype, remat: str,
                 stacked: bool = True):
        if stacked:
            self.layers = _stacked_layers(make_layer, num_layers, rngs)  # drawn first, as the layers always were
        else:  # a list of layers, each with its own weights (see unstacked_decoder)
            self.layers = nnx.List([make_layer(rngs) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.embed_positions = nnx.Embed(
            cfg.max_position_embeddings + POSITION_OFFSET,
            cfg.d_model,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(cfg.init_std),
            embedding_metadata=_axes("norm", "embed"),
            rngs=rngs,
        )
        self.layernorm_embedding = _layer_norm(cfg.d_model, rngs=rngs, param_dtype=param_dtype)
        self.layer_norm = _layer_norm(cfg.d_model, rngs=rngs, param_dtype=param_dtype) if cfg.normalize_before else None
        self.dropout_rate = cfg.dropout
        self.remat = check_remat(remat)

    def _embed(self, tokens_BxLxD, positions_BxL, key) -> jax.Array:
        h_BxLxD = tokens_BxLxD + _lookup(self.embed_positions, positions_BxL + POSITION_OFFSET, POSITION_TABLE)
        return constrain(dropout(self.layernorm_embedding(h_BxLxD), self.dropout_rate, key), HIDDEN)

    def _final(self, h_BxLxD) -> jax.Array:
        return h_BxLxD if self.layer_norm is None else self.layer_norm(h_BxLxD)

    def _scan(self, body, h, xs):
        """``body(layer, h, x) -> (h, y)`` over the layers in order with ``jax.lax.scan``: ``xs`` and the
        returned ``ys`` have a leading layer axis. ``remat`` (a policy name) sets which of each layer's
        activations are recomputed in the backward pass instead of stored. Unstacked layers (a list, see
        ``unstacked_decoder``: decoding only) run as a Python loop, without remat.

        Traced for the CPU (``UNROLLED_PLATFORMS``), the stacked layers run as a Python loop too, over
        the stack split once into per-layer arrays (``_unstack``): XLA:CPU runs a scan's per-iteration
        slices of the weights, and in the backward pass its zero-filled gradient stacks and per-layer
        updates of them, as separate copies (BART-base + BERT-base: 0.6 s of a 3.1 s forward + backward,
        experiments/bench/results/profile_mid.md; the training step 10-16% faster unrolled); a split is one copy
        of the weights, and its gradient one concatenation. The compiled program grows with depth there, as
        before layers were stacked."""
        if isinstance(self.layers, nnx.List):  # unstacked: a Python loop, each layer's weights read in place
            ys = []
            for i, layer in enumerate(self.layers):
                h, y = body(layer, h, jax.tree.map(lambda a: a[i], xs))
                ys.append(y)
            return h, jax.tree.map(lambda *y: jnp.stack(y), *ys)
        graphdef, state = nnx.split(self.layers)

        def step(h, state_and_x):
            layer_state, x = state_and_x
            return body(nnx.merge(graphdef, layer_state), h, x)

        if platform() in UNROLLED_PLATFORMS:
            layer_step, ys = rematerialised(step, self.remat, in_scan=False), []
            for layer_state_and_x in zip(_unstack(state, self.num_layers), _unstack(xs, self.num_layers)):
                h, y = layer_step(h, layer_state_and_x)
                ys.append(y)
            return h, jax.tree.map(lambda *y: jnp.stack(y), *ys)
        return jax.lax.scan(rematerialised(step, self.remat), h, (state, xs))


UNROLLED_PLATFORMS = ("cpu",)
"""Platforms on which stacked layers run as an unrolled loop over per-layer arrays (``_Stack._scan``)."""


def _unstack(tree, n: int) -> list:
    """The ``n`` slices of every leaf's leading axis, as ``n`` trees, by one ``jax.lax.split`` per leaf
    (whose transpose concatenates the slices' gradients into one stacked array)."""
    leaves, treedef = jax.tree.flatten(tree)
    pieces = [jax.lax.split(leaf, [1] * n) for leaf in leaves]
    return [treedef.unflatten([p[i].reshape(p[i].shape[1:]) for p in pieces]) for i in range(n)]


class Encoder(_Stack):
    def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs, dtype, param_dtype, remat: str):
        def make_layer(rngs):
            return EncoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        super().__init__(cfg, make_layer, cfg.encoder_layers, rngs=rngs, param_dtype=param_dtype, remat=remat)

    def __call__(self, tokens_BxSxD, attention_mask_BxS, key) -> jax.Array:
        embedding_key, layer_keys_L = _embedding_and_layer_keys(key, self.num_layers)
        b, s = attention_mask_BxS.shape
        h_BxSxD = self._embed(tokens_BxSxD, jnp.broadcast_to(jnp.arange(s), (b, s)), embedding_key)
        mask = padding_mask(attention_mask_BxS)

        def body(layer, h_BxSxD, layer_key):
            return layer(h_BxSxD, mask, layer_key), None

        h_BxSxD, _ = self._scan(body, h_BxSxD, layer_keys_L)
        return self._final(h_BxSxD)


class Decoder(_Stack):
    def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs, dtype, param_dtype, remat: str, stacked: bool = True):
        def make_layer(rngs):
            return DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        super().__init__(cfg, make_layer, cfg.decoder_layers, rngs=rngs, param_dtype=param_dtype, remat=remat,
                         stacked=stacked)  # fmt: skip

    def cross_kv(self, enc_CxSxD) -> tuple[jax.Array, jax.Array]:
        """Every layer's cross-attention keys and values of the encoder output: two ``[L, C, H, S, Dh]``."""
        if isinstance(self.layers, nnx.List):
            k_L, v_L = zip(*(layer.encoder_attn.project_kv(enc_CxSxD) for layer in self.layers))
            return jnp.stack(k_L), jnp.stack(v_L)
        graphdef, state = nnx.split(self.layers)
        return jax.vmap(lambda layer_state: nnx.merge(graphdef, layer_state).encoder_attn.project_kv(enc_CxSxD))(state)

    def __call__(self, tokens_BxTxD, index_B, self_mask: KeyMask, cross_mask: KeyMask, cross_kv, self_kv, key):
        """``cross_kv`` and ``self_kv`` (None: no cache) are every layer's keys/values, ``[L, ...]`` pairs;
        returns the hidden states and, with ``self_kv``, this step's self-attention keys/values of every
        layer, ``[L, B, H, T, Dh]`` (None without)."""
        embedding_key, layer_keys_L = _embedding_and_layer_keys(key, self.num_layers)
        t = tokens_BxTxD.shape[1]
        h_BxTxD = self._embed(tokens_BxTxD, index_B[:, None] + jnp.arange(t)[None, :], embedding_key)

        def body(layer, h_BxTxD, x):
            layer_cross_kv, layer_self_kv, layer_key = x
            h_BxTxD, new_kv = layer(
                h_BxTxD, self_mask, layer_cross_kv, cross_mask, layer_self_kv, index_B, layer_key
            )
            return h_BxTxD, None if layer_self_kv is None else new_kv

        h_BxTxD, new_kv = self._scan(body, h_BxTxD, (cross_kv, self_kv, layer_keys_L))
        return self._final(h_BxTxD), new_kv


def _self_attention_mask(index_B, t: int, length: int, decoder_attention_mask) -> jax.Array:
    """``[B, 1, T, L]``: query t (absolute position index + t) sees key slot j iff j <= index + t and the
    decoder mask keeps j. A mask shorter than L counts the missing slots as padding."""
    query_pos_BxT = index_B[:, None] + jnp.arange(t)[None, :]
    causal_BxTxL = jnp.arange(length)[None, None, :] <= query_pos_BxT[:, :, None]
    if decoder_attention_mask is None:
        return causal_BxTxL[:, None]
    keep_BxL = decoder_attention_mask.astype(bool)
    keep_BxL = jnp.pad(keep_BxL, ((0, 0), (0, length - keep_BxL.shape[1])))
    return (causal_BxTxL & keep_BxL[:, None, :])[:, None]


class Bart(nnx.Module):
    """``BartForConditionalGeneration``: shared token embedding, encoder, decoder, tied LM head + bias."""

    def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32, remat: str = "none",
                 stacked_decoder: bool = True):
        if cfg.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function={cfg.activation_function!r} is not one of {sorted(ACTIVATIONS)}")
        dtype = dtype or param_dtype
        self.config = cfg
        self.dtype = dtype
        self.shared = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            param_dtype=param_dtype,
            embedding_init=_token_embedding_init(cfg.init_std, cfg.pad_token_id),
            embedding_metadata=_axes("vocab", "embed"),
            rngs=rngs,
        )
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.encoder = Encoder(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat)
        self.decoder = Decoder(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat, stacked=stacked_decoder)
        self.final_logits_bias = Buffer(jnp.zeros((cfg.vocab_size,), param_dtype))

    def _embed_tokens(self, ids_BxL) -> jax.Array:
        """Scaled token embeddings. As torch's ``Embedding(padding_idx=pad)``, looking up the padding token
        sends no gradient to its row (the tied LM head still does)."""
        emb_BxLxD = _lookup(self.shared, ids_BxL, VOCAB_TABLE)
        is_pad_BxLx1 = (ids_BxL == self.config.pad_token_id)[..., None]
        return jnp.where(is_pad_BxLx1, jax.lax.stop_gradient(emb_BxLxD), emb_BxLxD) * self.embed_scale

    def encode(self, input_ids_BxS, attention_mask_BxS, *, deterministic=True, rngs: nnx.Rngs | None = None):
        """Encoder output ``[B, S, D]`` (float32 for float32 or bfloat16 compute alike)."""
        key = _draw_key(deterministic, rngs)
        return self.encoder(self._embed_tokens(input_ids_BxS), attention_mask_BxS, key)

    def init_cache(self, enc_CxSxD, attention_mask_CxS, max_length: int, rows_per_input: int = 1) -> DecodeCache:
        """An empty ``DecodeCache`` for up to ``max_length`` decoded tokens, with every layer's
        cross-attention keys/values computed once from ``enc``; ``rows_per_input`` decoder rows per
        encoder row (e.g. the beams of a search) share them (see ``with_decoder_rows``)."""
        cross_k_LxCxHxSxK, cross_v_LxCxHxSxK = self.decoder.cross_kv(enc_CxSxD)
        no_slots_LxCxHx0xK = jnp.zeros_like(cross_k_LxCxHxSxK[:, :, :, :0], self.dtype)
        index_C = jnp.zeros(attention_mask_CxS.shape[:1], jnp.int32)
        cache = DecodeCache(
            no_slots_LxCxHx0xK, no_slots_LxCxHx0xK, cross_k_LxCxHxSxK, cross_v_LxCxHxSxK, attention_mask_CxS, index_C
        )
        return with_decoder_rows(cache, rows_per_input, max_length)

    def decode(
        self,
        decoder_input_ids_BxT,
        enc_BxSxD,
        attention_mask_BxS,
        decoder_attention_mask=None,
        *,
        cache: DecodeCache | None = None,
        deterministic=True,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, DecodeCache | None]:
        """Float32 logits ``[B, T, V]`` of the decoder, and the updated cache.

        Without ``cache``: a full forward over ``decoder_input_ids`` (positions 0..T-1), cross-attending to
        ``enc_BxSxD`` under ``attention_mask_BxS``; ``decoder_attention_mask`` is ``[B, T]``; returns
        ``(logits, None)``.

        With ``cache``: the T new tokens sit at positions ``cache.index .. index + T - 1``; the
        cross-attention uses the cache's keys/values and encoder mask (``enc_BxSxD`` and
        ``attention_mask_BxS`` are then not used and may be None; a cache with C < B encoder rows serves
        decoder rows ``c * B / C ..`` from encoder row c, see ``DecodeCache``). ``decoder_attention_mask`` is None
        (no decoder padding) or a mask over cache slots ``[B, L]`` with ``index + T <= L <= max_length``:
        the mask of the whole prefix so far, or a fixed ``[B, max_length]`` mask for use under jit.
        Returns the cache advanced by T.
        """
        key = _draw_key(deterministic, rngs)
        b, t = decoder_input_ids_BxT.shape
        if cache is None:
            index_B = jnp.zeros((b,), jnp.int32)
            decoder_mask_BxT = jnp.ones((b, t), bool) if decoder_attention_mask is None else decoder_attention_mask
            self_mask = padding_mask(decoder_mask_BxT, causal=True)
            cross_mask = padding_mask(attention_mask_BxS)
            cross_kv = self.decoder.cross_kv(enc_BxSxD)
            self_kv = None
        else:
            index_B = cache.index_B
            self_mask = KeyMask(_self_attention_mask(index_B, t, cache.max_length, decoder_attention_mask))
            cross_mask = padding_mask(cache.encoder_mask_CxS)
            cross_kv = (cache.cross_k_LxCxHxSxK, cache.cross_v_LxCxHxSxK)
            self_kv = (cache.self_k_LxBxHxMxK, cache.self_v_LxBxHxMxK)
        tokens_BxTxD = self._embed_tokens(decoder_input_ids_BxT)
        h_BxTxD, new_kv = self.decoder(tokens_BxTxD, index_B, self_mask, cross_mask, cross_kv, self_kv, key)
        logits_BxTxV = self._lm_head(h_BxTxD)
        if cache is None:
            return logits_BxTxV, None
        self_k_LxBxHxMxK, self_v_LxBxHxMxK = (
            _write_at_every_layer(cached, new, index_B) for cached, new in zip(self_kv, new_kv)
        )
        return logits_BxTxV, dataclasses.replace(
            cache, self_k_LxBxHxMxK=self_k_LxBxHxMxK, self_v_LxBxHxMxK=self_v_LxBxHxMxK, index_B=index_B + t
        )

    def _lm_head(self, h_BxTxD) -> jax.Array:
        """Tied output projection (``h @ shared.T``) plus ``final_logits_bias``, in float32. On a mesh the
        projection's vocabulary rows stay split and its hidden dimension is gathered, as are the logits'."""
        embedding_VxD = constrain(self.shared.embedding[...].astype(self.dtype), VOCAB_TABLE)
        logits_BxTxV = jnp.einsum(
            "btd,vd->btv", h_BxTxD.astype(self.dtype), embedding_VxD, preferred_element_type=jnp.float32
        )
        return constrain(logits_BxTxV + self.final_logits_bias[...].astype(jnp.float32)[None, None, :], LOGITS)

    def __call__(
        self,
        input_ids_BxS,
        attention_mask_BxS,
        decoder_input_ids_BxT,
        decoder_attention_mask_BxT=None,
        *,
        deterministic=True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Float32 logits ``[B, T, V]`` of a full encoder-decoder forward (teacher forcing)."""
        enc_BxSxD = self.encode(input_ids_BxS, attention_mask_BxS, deterministic=deterministic, rngs=rngs)
        logits_BxTxV, _ = self.decode(
            decoder_input_ids_BxT,
            enc_BxSxD,
            attention_mask_BxS,
            decoder_attention_mask_BxT,
            deterministic=deterministic,
            rngs=rngs,
        )
        return logits_BxTxV


def count_params(model: nnx.Module) -> int:
    """Number of trainable (``nnx.Param``) scalars; the tied embedding counts once, buffers not at all."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_logical_axes(model: nnx.Module) -> dict:
    """The logical axes every ``nnx.Param`` of ``model`` (also an abstract one, from ``nnx.eval_shape``)
    declared when created, as a nested dict shaped like ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``
    with tuples of names as leaves. A parameter that declared none is left out."""
    declared = {
        path: tuple(variable.get_metadata()["out_sharding"])
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if variable.get_metadata().get("out_sharding")
    }
    return nnx.traversals.unflatten_mapping(declared)


def unstacked_decoder(model: Bart) -> Bart:
    """``model`` with its decoder layers as a list of layers, each holding its own copy of its weights
    (everything else shared, not copied); computes what ``model`` computes.

    For decoding on XLA:CPU: inside the token loop a stacked decoder reads each layer's weights as a
    slice of the stack, which XLA:CPU copies at every token (all decoder weights per token, measured
    about 10% of a BART-base decoding call); per-layer arrays are read in place. The cost is a second
    copy of the decoder layers' weights, and a decode program whose compile time grows with depth.
    """
    param_dtype = model.shared.embedding.dtype
    twin = nnx.eval_shape(lambda: Bart(model.config, rngs=nnx.Rngs(0), dtype=model.dtype, param_dtype=param_dtype,
                                       remat=model.decoder.remat, stacked_decoder=False))  # fmt: skip
    values = nnx.to_pure_dict(nnx.state(model))
    stacked_layers = values["decoder"]["layers"]
    values["decoder"]["layers"] = {i: jax.tree.map(lambda a: a[i], stacked_layers) for i in range(model.config.decoder_layers)}
    state = nnx.state(twin)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(twin, state)
    return twin
