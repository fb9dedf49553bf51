"""The BART generator against transformers' BartForConditionalGeneration (and mBART), the KV cache,
dropout, mixed precision, strict weight conversion and the HF round trip."""

import copy
import dataclasses
import shutil

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rag_jax.hf.bart import TIED_ALIASES, bart_from_hf, bart_state_to_hf, key_table
from rag_jax.hf.generator import load_generator, save_generator_hf
from rag_jax.hf.io import CheckpointKeyError, read_config, read_state_dict
from rag_jax.models import bart
from rag_jax.models.bart import Attention, Bart, count_params, take_decoder_rows, unstacked_decoder
from rag_jax.models.configs import BartConfig
from rag_jax.models.remat import REMAT_POLICIES

VOCAB = 97
TOL = 1e-5

TINY = dict(
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=40,
)
CONFIGS = {
    "gelu": dict(activation_function="gelu"),
    "relu_scaled": dict(
        activation_function="relu",
        scale_embedding=True,
        encoder_layers=1,
        decoder_layers=3,
        encoder_attention_heads=2,
        decoder_attention_heads=8,
        encoder_ffn_dim=40,
        decoder_ffn_dim=24,
    ),
    "silu_scaled": dict(
        activation_function="silu",
        scale_embedding=True,
        d_model=48,
        encoder_attention_heads=6,
        decoder_attention_heads=3,
    ),
    "mbart": dict(
        activation_function="gelu_new",
        scale_embedding=True,
        encoder_layers=3,
        decoder_layers=1,
        encoder_attention_heads=8,
    ),
}


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (layer norms and biases included) and a nonzero final_logits_bias."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape, generator=gen))
    return model.eval()


def _hf_model(name: str):
    kwargs = {**TINY, **CONFIGS[name]}
    if name == "mbart":
        return transformers.MBartForConditionalGeneration(transformers.MBartConfig(**kwargs))
    return transformers.BartForConditionalGeneration(transformers.BartConfig(**kwargs))


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """name -> (perturbed torch model, folder it was saved to)."""
    out = {}
    for seed, name in enumerate(CONFIGS):
        torch.manual_seed(seed)
        model = _perturbed(_hf_model(name), seed)
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


@pytest.fixture(scope="module")
def inputs():
    """Encoder ids with right and left padding, decoder ids with right padding (B=3, S=9, T=6)."""
    rng = np.random.RandomState(0)
    ids = rng.randint(3, VOCAB, (3, 9))
    mask = np.ones((3, 9), np.int32)
    mask[1, 6:] = 0
    mask[2, :2] = 0
    dec = rng.randint(3, VOCAB, (3, 6))
    dec_mask = np.ones((3, 6), np.int32)
    dec_mask[1, 4:] = 0
    return ids, mask, dec, dec_mask


def _torch_logits(model, ids, mask, dec, dec_mask):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec),
            decoder_attention_mask=torch.tensor(dec_mask),
        )
    return out.logits.numpy()


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(hf_folders, inputs, name):
    hf_model, folder = hf_folders[name]
    generator = load_generator(folder)
    assert generator.config.normalize_before == (name == "mbart")
    logits = generator.logits(*inputs)
    assert logits.dtype == jnp.float32 and logits.shape == (3, 6, VOCAB)
    diff = _max_diff(logits, _torch_logits(hf_model, *inputs))
    print(f"{name}: max |logits - torch| = {diff:.2e}")
    assert diff <= TOL


def test_gradients_match_transformers(inputs):
    """Gradients of a weighted sum of the logits, with padding tokens in both inputs (torch sends none to the
    padding row of the embedding through lookups)."""
    hf_config = transformers.BartConfig(**{**TINY, "encoder_layers": 1, "decoder_layers": 1})
    hf_model = _perturbed(transformers.BartForConditionalGeneration(hf_config), seed=7)
    ids, mask, dec, dec_mask = (np.array(x) for x in inputs)
    ids[1, 6:], dec[1, 4:] = 1, 1  # pad_token_id
    weights = np.random.RandomState(3).randn(3, 6, VOCAB).astype(np.float32)
    hf_state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}  # with the tied aliases
    graphdef, state = nnx.split(bart_from_hf(hf_state, BartConfig.from_hf(hf_config)))
    loss = lambda state: (nnx.merge(graphdef, state)(ids, mask, dec, dec_mask) * weights).sum()
    grads = bart_state_to_hf(nnx.merge(graphdef, jax.jit(jax.grad(loss))(state)))

    hf_model.zero_grad()
    logits = hf_model(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        decoder_input_ids=torch.tensor(dec),
        decoder_attention_mask=torch.tensor(dec_mask),
    ).logits
    (logits * torch.tensor(weights)).sum().backward()
    reference = {k: p.grad.numpy() for k, p in hf_model.named_parameters()}
    assert set(reference) == set(grads) - {"final_logits_bias"}
    worst = max(_max_diff(grads[key], grad) / max(1.0, float(np.abs(grad).max())) for key, grad in reference.items())
    print(f"max |grad - torch| / max(1, max |torch grad|) = {worst:.2e}")
    assert worst <= TOL


@pytest.mark.parametrize("name", ["relu_scaled", "mbart"])
def test_encoder_output_matches_transformers(hf_folders, inputs, name):
    hf_model, folder = hf_folders[name]
    ids, mask, _, _ = inputs
    enc = load_generator(folder).model.encode(ids, mask)
    with torch.no_grad():
        ref = hf_model.get_encoder()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    assert _max_diff(enc, ref.numpy()) <= TOL


@jax.jit
def _decode_step(graphdef, state, ids_BxT, cache, dec_mask):
    return nnx.merge(graphdef, state).decode(ids_BxT, None, None, dec_mask, cache=cache)


@jax.jit
def _decode_loop(graphdef, state, cache, dec_BxT, dec_mask_BxT):
    """Token-by-token decoding of ``dec`` inside ``lax.fori_loop`` (a while loop), collecting the logits."""
    model = nnx.merge(graphdef, state)
    b, t = dec_BxT.shape

    def body(i, carry):
        cache, out_BxTxV = carry
        ids_Bx1 = jax.lax.dynamic_slice_in_dim(dec_BxT, i, 1, axis=1)
        logits_Bx1xV, cache = model.decode(ids_Bx1, None, None, dec_mask_BxT, cache=cache)
        return cache, jax.lax.dynamic_update_slice_in_dim(out_BxTxV, logits_Bx1xV, i, axis=1)

    cache, out_BxTxV = jax.lax.fori_loop(0, t, body, (cache, jnp.zeros((b, t, VOCAB), jnp.float32)))
    return out_BxTxV, cache.index_B


@pytest.fixture(scope="module")
def gelu(hf_folders, inputs):
    """The "gelu" model, its full-forward logits on ``inputs`` and its encoder output."""
    generator = load_generator(hf_folders["gelu"][1])
    ids, mask, _, _ = inputs
    return generator.model, generator.logits(*inputs), generator.model.encode(ids, mask)


@pytest.mark.parametrize("layers", ["stacked", "unstacked"])
def test_cached_decoding_token_by_token_in_while_loop(gelu, inputs, layers):
    model, full, enc = gelu
    _, mask, dec, dec_mask = inputs
    if layers == "unstacked":  # decoding on CPU: the decoder layers as a list, each with its own weights
        model = unstacked_decoder(model)
        shared, original = (jax.tree.leaves(nnx.state(m.shared))[0] for m in (model, gelu[0]))
        assert len(model.decoder.layers) == 2 and shared is original  # not decoder layers: shared, not copied
    cache = model.init_cache(enc, mask, max_length=8)
    stepped, index = _decode_loop(*nnx.split(model), cache, dec, dec_mask)
    np.testing.assert_array_equal(index, [6, 6, 6])
    assert _max_diff(stepped, full) <= TOL


def test_cached_decoding_prefix_then_tokens(gelu, inputs):
    model, full, enc = gelu
    _, mask, dec, dec_mask = inputs
    graphdef, state = nnx.split(model)
    cache = model.init_cache(enc, mask, max_length=8)
    logits, cache = _decode_step(graphdef, state, dec[:, :3], cache, dec_mask)
    pieces = [logits]
    for t in range(3, 6):
        logits, cache = _decode_step(graphdef, state, dec[:, t : t + 1], cache, dec_mask)
        pieces.append(logits)
    assert _max_diff(jnp.concatenate(pieces, axis=1), full) <= TOL
    np.testing.assert_array_equal(cache.index_B, [6, 6, 6])


def test_cache_rows_reorder_like_beams(gelu, inputs):
    model, _, enc = gelu
    _, mask, dec, dec_mask = inputs
    graphdef, state = nnx.split(model)
    cache = model.init_cache(enc, mask, max_length=8)
    _, cache = _decode_step(graphdef, state, dec[:, :3], cache, dec_mask)
    perm = np.array([2, 0, 0])
    # one group of rows; the self-attention state moves, and with C = B the rest too:
    reordered = take_decoder_rows(cache, perm[None])
    reordered = dataclasses.replace(
        reordered,
        cross_k_LxCxHxSxK=cache.cross_k_LxCxHxSxK[:, perm],  # rows follow the layer axis
        cross_v_LxCxHxSxK=cache.cross_v_LxCxHxSxK[:, perm],
        encoder_mask_CxS=cache.encoder_mask_CxS[perm],
    )
    logits, _ = _decode_step(graphdef, state, dec[perm, 3:4], reordered, dec_mask[perm])
    expected, _ = _decode_step(graphdef, state, dec[:, 3:4], cache, dec_mask)
    np.testing.assert_allclose(logits, expected[perm], atol=1e-6)


def test_decoder_rows_share_encoder_rows(gelu, inputs):
    """Two decoder rows per encoder row (other tokens, other decoder masks) read the shared cross-attention
    keys/values as rows of a cache built from the repeated encoder output do, prefix and single steps."""
    model, _, enc = gelu
    _, mask, dec, dec_mask = inputs
    graphdef, state = nnx.split(model)
    dec_R = np.stack([dec, np.roll(dec, 1, axis=0)], axis=1).reshape(6, -1)  # rows (c, g)
    dec_mask_R = np.stack([dec_mask, np.roll(dec_mask, 1, axis=0)], axis=1).reshape(6, -1)
    shared = model.init_cache(enc, mask, max_length=8, rows_per_input=2)
    copied = model.init_cache(jnp.repeat(enc, 2, axis=0), jnp.repeat(mask, 2, axis=0), max_length=8)
    assert shared.cross_k_LxCxHxSxK.shape[:2] == (2, 3) and shared.self_k_LxBxHxMxK.shape[:2] == (2, 6)
    for ids in (dec_R[:, :3], dec_R[:, 3:4], dec_R[:, 4:5]):
        logits, shared = _decode_step(graphdef, state, ids, shared, dec_mask_R)
        expected, copied = _decode_step(graphdef, state, ids, copied, dec_mask_R)
        assert _max_diff(logits, expected) <= 1e-6
    np.testing.assert_array_equal(shared.index_B, [5] * 6)
    attention = Attention(model.config, 4, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    cross_k, cross_v = attention.project_kv(enc)
    with pytest.raises(ValueError, match="4 query rows cannot share 3 rows"):
        attention(jnp.zeros((4, 1, enc.shape[-1])), cross_k, cross_v, jnp.ones((3, 1, 1, enc.shape[1]), bool), key=None)


def _dropout_config() -> BartConfig:
    return BartConfig(
        **{**TINY, "decoder_layers": 1, "encoder_layers": 1},
        dropout=0.3,
        attention_dropout=0.2,
        activation_dropout=0.1,
    )


def _fast_key(seed: int) -> jax.Array:
    """A dropout key whose random bits compile much faster on CPU than the default threefry's."""
    return jax.random.key(seed, impl="rbg")


@jax.jit
def _forward(graphdef, state, key, ids, mask, dec, dec_mask):
    """Logits with dropout under ``nnx.Rngs(dropout=key)``, or deterministic ones when ``key`` is None."""
    rngs = None if key is None else nnx.Rngs(dropout=key)
    return nnx.merge(graphdef, state)(ids, mask, dec, dec_mask, deterministic=key is None, rngs=rngs)


def test_dropout_only_when_not_deterministic_and_reproducible(inputs):
    model = Bart(_dropout_config(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    first, again, other = (_forward(graphdef, state, _fast_key(seed), *inputs) for seed in (1, 1, 2))
    det = _forward(graphdef, state, None, *inputs)
    np.testing.assert_array_equal(first, again)
    assert _max_diff(first, det) > 1e-2
    assert _max_diff(first, other) > 1e-2
    with pytest.raises(ValueError, match="rngs"):
        model(*inputs, deterministic=False)


def _remat_loss(cfg: BartConfig, remat: str):
    """A dropout-on training loss of the logits as a function of the weights, and the weights."""
    ids, mask, dec, _ = (np.ones((2, 5), np.int32),) * 4
    graphdef, state = nnx.split(Bart(cfg, rngs=nnx.Rngs(0), remat=remat))

    def loss(state):
        model = nnx.merge(graphdef, state)
        return model(ids, mask, dec, deterministic=False, rngs=nnx.Rngs(dropout=_fast_key(3))).sum()

    return loss, state


def _count_primitives(jaxpr, name: str) -> int:
    """Equations of primitive ``name`` in ``jaxpr`` and every jaxpr nested in it (scan bodies...)."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _count_primitives(sub, name)
    return count


def _remat_policies(jaxpr) -> list:
    """The ``policy`` of every rematerialised body in ``jaxpr`` and the jaxprs nested in it."""
    policies = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "remat2":
            policies.append(eqn.params["policy"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            policies += _remat_policies(sub)
    return policies


@pytest.fixture
def scanned(monkeypatch):
    """Stacked layers scanned on the CPU too, as on TPU/GPU (the CPU unrolls them: ``bart.UNROLLED_PLATFORMS``)."""
    monkeypatch.setattr(bart, "UNROLLED_PLATFORMS", ())


def test_remat_wraps_the_scanned_layer_with_its_policy(scanned):
    """One rematerialised layer body per stack, inside its scan (not one per layer), with the policy
    named; the backward pass recomputes the matmuls the policy does not save: all of them ("full"),
    the attention products only ("dots_with_no_batch_dims_saveable"), none ("dots_saveable")."""

    def grad_jaxpr(remat):
        loss, state = _remat_loss(_dropout_config(), remat)
        return jax.make_jaxpr(jax.grad(loss))(state).jaxpr

    jaxprs = {remat: grad_jaxpr(remat) for remat in REMAT_POLICIES}
    assert _remat_policies(jaxprs["none"]) == []
    assert _remat_policies(jaxprs["full"]) == [None, None]
    saveable = jax.checkpoint_policies
    assert _remat_policies(jaxprs["dots_saveable"]) == [saveable.dots_saveable] * 2
    no_batch_dims = _remat_policies(jaxprs["dots_with_no_batch_dims_saveable"])
    assert no_batch_dims == [saveable.dots_with_no_batch_dims_saveable] * 2
    dots = {remat: _count_primitives(jaxpr, "dot_general") for remat, jaxpr in jaxprs.items()}
    assert dots["none"] == dots["dots_saveable"] < dots["dots_with_no_batch_dims_saveable"] < dots["full"], dots
    with pytest.raises(ValueError, match="remat=True is not one of"):
        Bart(_dropout_config(), rngs=nnx.Rngs(0), remat=True)


REMAT_TEST_CONFIG = BartConfig(**{**TINY, "decoder_layers": 3}, dropout=0.3, attention_dropout=0.2, activation_dropout=0.1)


def _remat_loss_and_grads(remat: str):
    fn, state = _remat_loss(REMAT_TEST_CONFIG, remat)
    with jax.default_matmul_precision("highest"):
        return jax.jit(jax.value_and_grad(fn))(state)


@pytest.fixture(scope="module")
def without_remat():
    """The loss and gradients without remat (computed once for the three policies)."""
    return _remat_loss_and_grads("none")


@pytest.mark.parametrize("remat", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_gives_the_same_loss_and_gradients(remat, without_remat):
    (loss, grads), (loss_remat, grads_remat) = without_remat, _remat_loss_and_grads(remat)
    assert float(loss) == pytest.approx(float(loss_remat), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_program_size_does_not_grow_with_depth(scanned):
    """The layers are scanned: a 6+6-layer model lowers (training step and cached decoding step) to
    about the same StableHLO as a 1+1-layer one (only shapes and constants differ)."""

    def hlo_sizes(layers):
        cfg = BartConfig(**{**TINY, "encoder_layers": layers, "decoder_layers": layers})
        loss, state = _remat_loss(cfg, remat="none")
        train = jax.jit(jax.grad(loss)).lower(state).as_text()
        model = Bart(cfg, rngs=nnx.Rngs(0))
        ids = np.ones((2, 5), np.int32)
        cache = model.init_cache(model.encode(ids, ids), ids, max_length=8)
        step = _decode_step.lower(*nnx.split(model), ids[:, :1], cache, None).as_text()
        return np.array([len(train), len(step)])

    shallow, deep = hlo_sizes(1), hlo_sizes(6)
    assert np.all(deep < 1.05 * shallow), (shallow, deep)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_cpu_unrolled_layers_equal_the_scan(remat, monkeypatch):
    """On the CPU the stacked layers run as a loop over per-layer slices (one split per weight, its
    gradient one concatenation): the same loss and gradients as the scan, one remat per layer."""
    cfg = BartConfig(**{**TINY, "decoder_layers": 3}, dropout=0.3, attention_dropout=0.2, activation_dropout=0.1)
    with jax.default_matmul_precision("highest"):
        unrolled = jax.jit(jax.value_and_grad(_remat_loss(cfg, remat)[0]))
        loss, grads = unrolled(_remat_loss(cfg, remat)[1])
        jaxpr = jax.make_jaxpr(jax.grad(_remat_loss(cfg, remat)[0]))(_remat_loss(cfg, remat)[1]).jaxpr
        monkeypatch.setattr(bart, "UNROLLED_PLATFORMS", ())
        scan_loss, scan_grads = jax.jit(jax.value_and_grad(_remat_loss(cfg, remat)[0]))(_remat_loss(cfg, remat)[1])
    assert float(loss) == pytest.approx(float(scan_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(scan_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert _count_primitives(jaxpr, "scan") == 0
    assert len(_remat_policies(jaxpr)) == (0 if remat == "none" else cfg.encoder_layers + cfg.decoder_layers)


def test_bf16_compute_is_close_to_float32(hf_folders, inputs):
    hf_model, folder = hf_folders["silu_scaled"]
    bf16 = load_generator(folder, dtype=jnp.bfloat16)
    assert bf16.model.shared.embedding.dtype == jnp.float32  # parameters stay float32
    ids, mask, dec, dec_mask = inputs
    ref, out = _torch_logits(hf_model, *inputs), bf16.logits(*inputs)
    assert out.dtype == jnp.float32
    diff, scale = _max_diff(out, ref), float(np.abs(ref).max())
    print(f"bf16: max |logits - torch float32| = {diff:.3f} (max |logit| {scale:.1f})")
    assert 0 < diff < 0.05 * scale

    def cached_step():
        cache = bf16.model.init_cache(bf16.model.encode(ids, mask), mask, max_length=8)
        return bf16.model.decode(dec[:, :2], None, None, cache=cache)

    logits, cache = jax.eval_shape(cached_step)
    assert logits.dtype == jnp.float32 and cache.self_k_LxBxHxMxK.dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def gelu_state(hf_folders):
    folder = hf_folders["gelu"][1]
    return read_state_dict(folder), BartConfig.from_hf(read_config(folder))


def test_saved_keys_are_the_table(gelu_state):
    state, cfg = gelu_state
    assert set(state) == set(key_table(nnx.state(nnx.eval_shape(lambda: Bart(cfg, rngs=nnx.Rngs(0))))))


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda s: s.pop("model.encoder.layers.0.fc1.weight"), "model.encoder.layers.0.fc1.weight"),
        (lambda s: s.update({"model.encoder.extra.weight": np.zeros(3)}), "model.encoder.extra.weight"),
        (lambda s: s.update({"lm_head.weight": s["model.shared.weight"] + 1}), "lm_head.weight"),
        (lambda s: s.update({"model.decoder.layers.1.fc2.bias": np.zeros(5)}), "model.decoder.layers.1.fc2.bias"),
    ],
    ids=["missing", "unexpected", "conflicting_alias", "wrong_shape"],
)
def test_strict_keys_name_the_offender(gelu_state, edit, named):
    state, cfg = gelu_state
    state = dict(state)
    edit(state)
    with pytest.raises(CheckpointKeyError, match=named.replace(".", r"\.")):
        bart_from_hf(state, cfg)


def test_tied_aliases_and_optional_final_logits_bias(gelu_state):
    state, cfg = gelu_state
    shared = state["model.shared.weight"]
    aliased = {k: v for k, v in state.items() if k not in ("model.shared.weight", "final_logits_bias")}
    aliased.update({alias: shared.copy() for alias in TIED_ALIASES})  # equal duplicates are fine
    model = bart_from_hf(aliased, cfg)
    np.testing.assert_array_equal(model.shared.embedding[...], shared)
    np.testing.assert_array_equal(model.final_logits_bias[...], np.zeros(VOCAB))
    assert not isinstance(model.final_logits_bias, nnx.Param)


def test_round_trip_through_transformers(hf_folders, inputs, tmp_path):
    hf_model, folder = hf_folders["gelu"]
    source = tmp_path / "source"
    shutil.copytree(folder, source)
    (source / "vocab.json").write_text('{"a": 0}')
    (source / "merges.txt").write_text("#version: 0.2\n")
    generator = load_generator(str(source))
    out = tmp_path / "export"
    save_generator_hf(generator, str(out))

    reloaded, info = transformers.BartForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    np.testing.assert_array_equal(_torch_logits(reloaded.eval(), *inputs), _torch_logits(hf_model, *inputs))
    assert (out / "vocab.json").read_text() == '{"a": 0}' and (out / "merges.txt").exists()
    original, exported = read_config(str(source)), read_config(str(out))
    assert {k: exported[k] for k in original} == original


def test_generator_inside_a_rag_checkpoint(hf_folders, inputs, tmp_path):
    hf_model = copy.deepcopy(hf_folders["gelu"][0])
    dpr_config = transformers.DPRConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    question_encoder = transformers.DPRQuestionEncoder(dpr_config)
    rag_config = transformers.RagConfig.from_question_encoder_generator_configs(dpr_config, hf_model.config)
    rag = transformers.RagTokenForGeneration(config=rag_config, question_encoder=question_encoder, generator=hf_model)
    rag.save_pretrained(str(tmp_path))
    state = read_state_dict(str(tmp_path))
    assert "rag.generator.model.shared.weight" in state
    model = bart_from_hf(state, BartConfig.from_hf(hf_model.config), prefix="rag.generator.")
    assert _max_diff(model(*inputs), _torch_logits(hf_model, *inputs)) <= TOL
    exported = bart_state_to_hf(model, prefix="rag.generator.")
    assert set(exported) == {k for k in state if k.startswith("rag.generator.")}


def test_bart_large_shapes_without_allocating():
    abstract = nnx.eval_shape(lambda: Bart(BartConfig(), rngs=nnx.Rngs(0)))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract)))
    with torch.device("meta"):
        reference = transformers.BartForConditionalGeneration(transformers.BartConfig())
    expected = sum(p.numel() for p in reference.parameters())
    assert count_params(abstract) == expected
    assert 400e6 < expected < 410e6

    hf_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items() if k not in TIED_ALIASES}
    flat = dict(nnx.to_flat_state(nnx.state(abstract)))
    ours = {k: e.hf_shape(flat[e.path].shape) for k, e in key_table(nnx.state(abstract)).items()}
    assert ours == hf_shapes


def test_decode_split_is_unstacked_on_cpu_and_follows_new_weights(hf_folders, inputs):
    generator = load_generator(hf_folders["gelu"][1])
    graphdef, state = generator.decode_split()
    assert isinstance(nnx.merge(graphdef, state).decoder.layers, nnx.List)  # this host is a CPU
    assert generator.decode_split()[1] is state  # made once per set of weights
    bias = generator.model.final_logits_bias
    bias[...] = bias[...] + 1.0  # a parameter array replaced in place: rebuilt, not stale
    _, new_state = generator.decode_split()
    assert new_state is not state
    np.testing.assert_allclose(new_state["final_logits_bias"][...], np.asarray(bias[...]))
