"""The RAG composite against transformers: loading a RAG folder, loss parity, gradients, export."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from tiny_models import RAG_CLASSES, VOCAB, tiny_rag

import rag_jax
from rag_jax.models import attention
from rag_jax.rag import objective
from rag_jax.rag.batches import FixedScoreRagBatch
from rag_jax.rag.model import per_doc_logits, per_example_loss, unflatten_docs

B, S, T = 3, 9, 6
PAD, BOS = 1, 0


def _inputs(n_docs: int, seed: int = 0, all_bos: bool = True):
    rng = np.random.default_rng(seed)
    ctx_ids = rng.integers(3, VOCAB, size=(B * n_docs, S))
    ctx_mask = np.ones((B * n_docs, S), np.int64)
    ctx_mask[1, -3:] = 0  # padded contexts
    ctx_mask[-1, -5:] = 0
    ctx_ids[ctx_mask == 0] = PAD
    doc_scores = rng.normal(size=(B, n_docs)).astype(np.float32) * 2
    labels = rng.integers(3, VOCAB, size=(B, T))
    labels[:, 0] = BOS
    if not all_bos:
        labels[1, 0] = 5
    labels[0, -2:] = PAD  # padded targets
    labels[2, -1] = PAD
    return ctx_ids, ctx_mask, doc_scores, labels


def _torch_loss(model, n_docs, inputs, epsilon, reduce, exclude_bos=None):
    ctx_ids, ctx_mask, doc_scores, labels = inputs
    model.config.label_smoothing = epsilon
    kwargs = dict(n_docs=n_docs, reduce_loss=reduce)
    if exclude_bos is not None:
        kwargs["exclude_bos_score"] = exclude_bos
    out = model(
        context_input_ids=torch.tensor(ctx_ids),
        context_attention_mask=torch.tensor(ctx_mask),
        doc_scores=torch.tensor(doc_scores, requires_grad=True),
        labels=torch.tensor(labels),
        **kwargs,
    )
    return out.loss.detach().numpy()


@pytest.fixture(scope="module", params=["token", "sequence"])
def pair(request, tmp_path_factory):
    """(variant, torch model, rag_jax model loaded from its saved folder)."""
    torch_model = tiny_rag(request.param, seed=1)
    folder = tmp_path_factory.mktemp(f"rag_{request.param}")
    torch_model.save_pretrained(folder)
    return request.param, torch_model, rag_jax.load_rag(folder), folder


def test_loaded_model_is_what_was_saved(pair):
    variant, torch_model, model, _ = pair
    assert model.variant == variant
    assert model.config.n_docs == torch_model.config.n_docs
    assert model.question_encoder.kind == "dpr_question"
    emb = model.generator.model.shared.embedding[...]
    np.testing.assert_array_equal(np.asarray(emb), torch_model.rag.generator.model.shared.weight.detach().numpy())


@pytest.mark.parametrize("n_docs", [1, 3, 5])
def test_loss_parity_grid(pair, n_docs):
    variant, torch_model, model, _ = pair
    inputs = _inputs(n_docs, seed=n_docs)
    bos_options = [None] if variant == "token" else [False, True]
    worst = 0.0
    for epsilon, reduce, exclude_bos, all_bos in itertools.product([0.0, 0.1], [False, True], bos_options, [True, False]):
        if not all_bos and not exclude_bos:
            continue  # the "not every row starts with BOS" case only matters for exclude_bos_score
        case_inputs = inputs if all_bos else _inputs(n_docs, seed=n_docs, all_bos=False)
        with torch.no_grad():
            expected = _torch_loss(torch_model, n_docs, case_inputs, epsilon, reduce, exclude_bos)
        got = model.loss(
            *case_inputs, variant=variant, n_docs=n_docs, epsilon=epsilon,
            exclude_bos_score=bool(exclude_bos), reduce=reduce, form="hf",
        )  # fmt: skip
        assert got.shape == expected.shape
        rel = np.max(np.abs(np.asarray(got) - expected) / np.maximum(np.abs(expected), 1e-6))
        worst = max(worst, rel)
    assert worst <= 1e-5, f"max relative loss difference {worst:.2e}"


def test_gradients_match_torch_autograd(pair):
    variant, torch_model, model, _ = pair
    n_docs = 3
    ctx_ids, ctx_mask, doc_scores, labels = _inputs(n_docs, seed=7)
    torch_model.zero_grad()
    torch_model.config.label_smoothing = 0.1
    scores_t = torch.tensor(doc_scores, requires_grad=True)
    loss_t = torch_model(
        context_input_ids=torch.tensor(ctx_ids), context_attention_mask=torch.tensor(ctx_mask),
        doc_scores=scores_t, labels=torch.tensor(labels), n_docs=n_docs, reduce_loss=True,
    ).loss  # fmt: skip
    loss_t.backward()

    spec = model.loss_spec(variant, epsilon=0.1, form="hf")
    graphdef, state = model.generator.split()

    def loss(state, doc_scores_BxK):
        batch = FixedScoreRagBatch(
            doc_scores_BxK, unflatten_docs(ctx_ids, n_docs), unflatten_docs(ctx_mask, n_docs), labels
        )
        return jnp.sum(per_example_loss(spec, (graphdef, state), None, batch))

    state_grad, scores_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, jnp.asarray(doc_scores))
    np.testing.assert_allclose(np.asarray(scores_grad), scores_t.grad.numpy(), rtol=1e-4, atol=1e-5)

    gen_t = torch_model.rag.generator.model
    pairs = [
        (state_grad["shared"]["embedding"][...], gen_t.shared.weight.grad),
        (state_grad["encoder"]["layers"]["fc1"]["kernel"][0], gen_t.encoder.layers[0].fc1.weight.grad.T),
        (state_grad["decoder"]["layers"]["encoder_attn"]["q_proj"]["kernel"][1],
         gen_t.decoder.layers[1].encoder_attn.q_proj.weight.grad.T),
    ]  # fmt: skip
    for ours, theirs in pairs:
        theirs = theirs.numpy()
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_vmapped_logits_equal_a_loop_over_docs(pair, platform):
    """On a platform with cuDNN's fused attention the documents are rows of one batch instead of a
    vmap (traced here for "gpu" in float32, which takes XLA's path): the same logits."""
    _, _, model, _ = pair
    n_docs = 3
    ctx_ids, ctx_mask, _, labels = _inputs(n_docs, seed=3)
    graphdef, state = nnx.split(model.generator.model)
    with attention.traced_for(platform):
        logits = per_doc_logits(graphdef, state, unflatten_docs(ctx_ids, n_docs), unflatten_docs(ctx_mask, n_docs),
                                labels)  # fmt: skip
    loop = [model.generator.logits(ctx_ids[k::n_docs], ctx_mask[k::n_docs], labels) for k in range(n_docs)]
    np.testing.assert_allclose(np.asarray(logits), np.stack(loop, axis=1), atol=1e-5)


def test_doc_scores_from_question_match_torch(pair):
    _, torch_model, model, _ = pair
    rng = np.random.default_rng(0)
    q_ids = rng.integers(3, VOCAB, size=(B, 7))
    q_mask = np.ones_like(q_ids)
    q_mask[0, -2:] = 0
    doc_embeds = rng.normal(size=(B, 4, 32)).astype(np.float32)
    with torch.no_grad():
        q = torch_model.rag.question_encoder(torch.tensor(q_ids), attention_mask=torch.tensor(q_mask))[0]
        expected = torch.bmm(q.unsqueeze(1), torch.tensor(doc_embeds).transpose(1, 2)).squeeze(1).numpy()
    np.testing.assert_allclose(np.asarray(model.doc_scores(q_ids, q_mask, doc_embeds)), expected, atol=1e-4)


@pytest.mark.parametrize("variant", ["token", "sequence"])
def test_export_round_trip(pair, variant, tmp_path):
    _, torch_model, model, _ = pair
    model.variant = variant
    rag_jax.save_hf(model, tmp_path)
    reloaded, info = RAG_CLASSES[variant].from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reloaded.eval()
    inputs = _inputs(3, seed=11)
    with torch.no_grad():
        expected = _torch_loss(reloaded, 3, inputs, 0.0, False, None)
    got = model.loss(*inputs, variant=variant, n_docs=3)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
    again = rag_jax.load_rag(tmp_path)
    np.testing.assert_array_equal(
        np.asarray(again.question_encoder.params["layers"]["query"]["kernel"]),
        np.asarray(model.question_encoder.params["layers"]["query"]["kernel"]),
    )


def test_strict_keys(pair, tmp_path):
    _, _, _, folder = pair
    state = load_file(f"{folder}/model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file({**state, "rag.generator.extra.weight": np.zeros(2, np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(rag_jax.CheckpointKeyError, match=r"extra\.weight"):
        rag_jax.load_rag(tmp_path)
    state.pop("rag.question_encoder.question_encoder.bert_model.encoder.layer.1.output.dense.bias")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(rag_jax.CheckpointKeyError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        rag_jax.load_rag(tmp_path)


def test_training_form_decoder_inputs_are_shifted_right(pair):
    """form="paper" scores every label (including a one-token answer) under shift-right inputs."""
    _, _, model, _ = pair
    ctx_ids, ctx_mask, doc_scores, _ = _inputs(3, seed=5)
    labels = np.full((B, T), PAD)
    labels[:, 0] = 17  # one-token answers
    loss = model.loss(ctx_ids, ctx_mask, doc_scores, labels, n_docs=3, form=objective.TRAINING_FORM)
    assert np.all(np.asarray(loss) > 0.5)
    hf = model.loss(ctx_ids, ctx_mask, doc_scores, labels, variant="token", n_docs=3, form="hf")
    np.testing.assert_allclose(np.asarray(hf), 0.0, atol=1e-6)


def test_generator_split_is_cached_and_sees_new_weights(tmp_path):
    """``Generator.split`` traverses the model once, yet calls after an in-place weight update (as
    training or ``nnx.update`` does) or after assigning another model use the current weights."""
    folder = tmp_path / "rag"
    tiny_rag("token", seed=2).save_pretrained(folder)
    model = rag_jax.load_rag(folder)
    ctx_ids, ctx_mask, doc_scores, labels = _inputs(2, seed=4)
    generator = model.generator
    assert generator.split()[1] is generator.split()[1]  # one traversal
    before = np.asarray(model.loss(ctx_ids, ctx_mask, doc_scores, labels, n_docs=2))

    scaled = jax.tree.map(lambda x: x * 1.5, nnx.state(generator.model, nnx.Param))
    nnx.update(generator.model, scaled)
    after_update = np.asarray(model.loss(ctx_ids, ctx_mask, doc_scores, labels, n_docs=2))
    generator.model = rag_jax.load_rag(folder).generator.model  # the original weights, a new module
    after_swap = np.asarray(model.loss(ctx_ids, ctx_mask, doc_scores, labels, n_docs=2))

    assert not np.allclose(after_update, before)
    np.testing.assert_allclose(after_swap, before, rtol=1e-6)
    fresh = rag_jax.load_rag(folder)
    nnx.update(fresh.generator.model, scaled)  # the scaled weights loaded and split from scratch
    from_scratch = np.asarray(fresh.loss(ctx_ids, ctx_mask, doc_scores, labels, n_docs=2))
    np.testing.assert_allclose(after_update, from_scratch, rtol=1e-6)


def test_loss_rejects_a_left_padded_host_mask(pair):
    _, _, model, _ = pair
    ctx_ids, ctx_mask, doc_scores, labels = _inputs(model.config.n_docs)
    with pytest.raises(ValueError, match="context_attention_mask has a token after padding"):
        model.loss(ctx_ids, ctx_mask[:, ::-1].copy(), doc_scores, labels)
