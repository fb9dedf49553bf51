"""The two attention paths (``rag_jax.models.attention``): ``jax.nn.dot_product_attention`` and the
explicit einsums give the same BART logits, cached (shared cross-attention rows) decoding steps and
gradients, and the same BERT hidden states, fully masked rows included; dropout keeps the explicit path.

The parity tests against transformers run on the path the backend takes (the explicit one on CPU);
``pytest --attention=dot_product`` runs them all through ``jax.nn.dot_product_attention``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rag_jax.models import attention
from rag_jax.models.bart import Bart
from rag_jax.models.bert import encode, init_params
from rag_jax.models.configs import BartConfig, BertConfig

BART = BartConfig(
    vocab_size=61, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=40,
    init_std=0.2, attention_dropout=0.0, dropout=0.1,
)  # fmt: skip
BERT = BertConfig(
    vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=24,
)  # fmt: skip


def _set_path(monkeypatch, dot_product: bool) -> None:
    """Make attention take one path on this backend (traced anew: compiled programs are dropped)."""
    monkeypatch.setattr(attention, "EXPLICIT_BACKENDS", () if dot_product else (jax.default_backend(),))
    jax.clear_caches()


def _both_paths(monkeypatch, fn):
    """``fn()`` on the explicit path, then on the ``jax.nn.dot_product_attention`` one."""
    results = []
    for dot_product in (False, True):
        _set_path(monkeypatch, dot_product)
        results.append(jax.tree.map(np.asarray, fn()))
    jax.clear_caches()
    return results


def _masks():
    """An encoder mask with right and left padding and one fully masked row; a decoder mask with padding."""
    mask_BxS = np.ones((3, 9), np.int32)
    mask_BxS[0, 6:] = 0
    mask_BxS[1, :] = 0
    mask_BxS[2, :2] = 0
    dec_mask_BxT = np.ones((3, 6), np.int32)
    dec_mask_BxT[2, 4:] = 0
    return mask_BxS, dec_mask_BxT


def _ids(shape, seed):
    return np.random.default_rng(seed).integers(3, 61, shape).astype(np.int32)


def test_paths_are_chosen_by_backend_and_dropout(monkeypatch):
    key = jax.random.key(0)
    _set_path(monkeypatch, dot_product=True)
    assert attention.use_dot_product_attention(0.1, None) and attention.use_dot_product_attention(0.0, key)
    assert not attention.use_dot_product_attention(0.1, key)  # probability dropout: explicit
    _set_path(monkeypatch, dot_product=False)
    assert not attention.use_dot_product_attention(0.0, None)


def test_bart_logits_gradients_and_shared_row_decoding_agree(monkeypatch):
    model = Bart(BART, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    mask_BxS, dec_mask_BxT = _masks()
    ids_BxS, dec_BxT = _ids((3, 9), 1), _ids((3, 6), 2)

    def logits():
        return jax.jit(lambda s: nnx.merge(graphdef, s)(ids_BxS, mask_BxS, dec_BxT, dec_mask_BxT))(state)

    def grads():  # training with dropout but no attention dropout: the dot_product path
        def loss(s):
            out = nnx.merge(graphdef, s)(ids_BxS, mask_BxS, dec_BxT, deterministic=False, rngs=nnx.Rngs(dropout=3))
            return jnp.sum(jax.nn.log_softmax(out)[..., 5])

        return jax.jit(jax.grad(loss))(state)

    def shared_row_steps():  # two beams per encoder row: 6 decoder rows read 3 rows of keys/values
        def run(s):
            model = nnx.merge(graphdef, s)
            cache = model.init_cache(model.encode(ids_BxS, mask_BxS), mask_BxS, max_length=8, rows_per_input=2)
            dec_RxT = jnp.repeat(dec_BxT, 2, axis=0)
            prefix, cache = model.decode(dec_RxT[:, :3], None, None, cache=cache)
            step, _ = model.decode(dec_RxT[:, 3:4], None, None, cache=cache)
            return prefix, step

        return jax.jit(run)(state)

    for fn, atol in ((logits, 1e-5), (grads, 1e-5), (shared_row_steps, 1e-5)):
        explicit, dot_product = _both_paths(monkeypatch, fn)
        for a, b in zip(jax.tree.leaves(explicit), jax.tree.leaves(dot_product)):
            np.testing.assert_allclose(b, a, atol=atol, rtol=1e-5)


def test_bert_hidden_states_agree():
    params = init_params(BERT, jax.random.key(0))
    mask_BxS, _ = _masks()
    ids_BxS = _ids((3, 9), 3)
    with pytest.MonkeyPatch.context() as monkeypatch:
        explicit, dot_product = _both_paths(
            monkeypatch, lambda: jax.jit(lambda p: encode(p, ids_BxS, mask_BxS, cfg=BERT))(params)
        )
    np.testing.assert_allclose(dot_product, explicit, atol=1e-5, rtol=1e-5)


def test_padding_masks_carry_lengths_only_when_declared_right_padded():
    mask_BxS = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.int32)
    assert attention.padding_mask(mask_BxS).lengths_B is None
    with attention.right_padded_masks():
        mask = attention.padding_mask(mask_BxS, causal=True)
    np.testing.assert_array_equal(mask.lengths_B, [3, 1])
    expected_Bx1x4x4 = np.tril(np.ones((4, 4), bool))[None, None] & mask_BxS.astype(bool)[:, None, None, :]
    np.testing.assert_array_equal(mask.keep_Bx1xTxS, expected_Bx1x4x4)
    assert attention.padding_mask(mask_BxS).lengths_B is None  # the declaration ends with the block


def test_fused_kernel_only_for_16_bit_gpu_attention_with_lengths(monkeypatch):
    with attention.right_padded_masks():
        mask = attention.padding_mask(np.ones((2, 4), np.int32))
    q_bf16, q_f32 = jnp.zeros((2, 4, 2, 64), jnp.bfloat16), jnp.zeros((2, 4, 2, 64), jnp.float32)
    assert not attention.fused_kernel_applies(q_bf16, q_bf16, mask)  # this host: CPU
    monkeypatch.setattr(attention, "platform", lambda: "gpu")
    assert attention.fused_kernel_applies(q_bf16, q_bf16, mask)
    assert not attention.fused_kernel_applies(q_f32, q_f32, mask)  # float32 (parity): XLA
    assert not attention.fused_kernel_applies(q_bf16, q_bf16, attention.KeyMask(mask.keep_Bx1xTxS))  # no lengths
    head_dim_12 = jnp.zeros((2, 4, 2, 12), jnp.bfloat16)
    assert not attention.fused_kernel_applies(head_dim_12, head_dim_12, mask)
    assert not attention.fused_kernel_applies(q_bf16[:, :3], q_bf16, mask)  # an odd query length


def test_the_platform_follows_the_current_mesh():
    assert attention.platform() == jax.default_backend()
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert attention.platform() == mesh.devices.flat[0].platform


def test_batches_reject_left_padded_masks():
    from rag_jax.rag.batches import FixedScoreRagBatch

    ids_BxKxS, labels_BxT, scores_BxK = np.ones((1, 2, 4), np.int32), np.ones((1, 3), np.int32), np.zeros((1, 2))
    right_BxKxS = np.array([[[1, 1, 0, 0], [1, 1, 1, 1]]], np.int32)
    FixedScoreRagBatch(scores_BxK, ids_BxKxS, right_BxKxS, labels_BxT)
    with pytest.raises(ValueError, match="context_attention_mask_BxKxS has a token after padding"):
        FixedScoreRagBatch(scores_BxK, ids_BxKxS, right_BxKxS[:, :, ::-1].copy(), labels_BxT)
