"""Parameter shardings from the logical axes the models declare, on a (data 2, fsdp 2, model 2) mesh."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rag_jax.config import MeshConfig
from rag_jax.models import bert
from rag_jax.models.bart import Bart, param_logical_axes
from rag_jax.models.configs import BartConfig, BertConfig
from rag_jax.training import sharding

# Every parameter's spec when every dimension divides its mesh axes (path after "query_encoder/" or
# "generator/"; "{stack}" is encoder or decoder, "{attn}" self_attn or, in the decoder, encoder_attn).
BERT_SPECS = {
    "embeddings/word": P("model", "fsdp"),
    "embeddings/position": P(None, "fsdp"),
    "embeddings/token_type": P(None, "fsdp"),
    "embeddings/norm/scale": P(None),
    "embeddings/norm/bias": P(None),
    **{f"layers/{name}/kernel": P(None, "fsdp", "model") for name in ("query", "key", "value", "mlp_in")},
    **{f"layers/{name}/bias": P(None, "model") for name in ("query", "key", "value", "mlp_in")},
    **{f"layers/{name}/kernel": P(None, "model", "fsdp") for name in ("attn_out", "mlp_out")},
    **{f"layers/{name}/bias": P(None, None) for name in ("attn_out", "mlp_out")},
    **{f"layers/{norm}/{p}": P(None, None) for norm in ("attn_norm", "mlp_norm") for p in ("scale", "bias")},
}
BART_STACK_SPECS = {
    "embed_positions/embedding": P(None, "fsdp"),
    "layernorm_embedding/scale": P(None),
    "layernorm_embedding/bias": P(None),
    "layers/fc1/kernel": P(None, "fsdp", "model"),
    "layers/fc1/bias": P(None, "model"),
    "layers/fc2/kernel": P(None, "model", "fsdp"),
    "layers/fc2/bias": P(None, None),
    **{f"layers/{{attn}}/{proj}/kernel": P(None, "fsdp", "model") for proj in ("q_proj", "k_proj", "v_proj")},
    **{f"layers/{{attn}}/{proj}/bias": P(None, "model") for proj in ("q_proj", "k_proj", "v_proj")},
    "layers/{attn}/out_proj/kernel": P(None, "model", "fsdp"),
    "layers/{attn}/out_proj/bias": P(None, None),
    **{f"layers/{norm}/{p}": P(None, None)
       for norm in ("{attn}_layer_norm", "final_layer_norm") for p in ("scale", "bias")},
}  # fmt: skip


def _bart_specs() -> dict[str, P]:
    specs = {"shared/embedding": P("model", "fsdp")}
    for stack, attns in (("encoder", ("self_attn",)), ("decoder", ("self_attn", "encoder_attn"))):
        for path, spec in BART_STACK_SPECS.items():
            for attn in attns:
                specs[f"{stack}/{path.format(attn=attn)}"] = spec
    return specs


def _train_params(bert_cfg: BertConfig, bart_cfg: BartConfig):
    """Abstract train-state parameters (no weights) and their declared logical axes, as the Trainer holds them."""
    abstract_bart = nnx.eval_shape(lambda: Bart(bart_cfg, rngs=nnx.Rngs(0)))
    params = {
        "query_encoder": jax.eval_shape(lambda: bert.init_params(bert_cfg, jax.random.key(0))),
        "generator": nnx.to_pure_dict(nnx.state(abstract_bart, nnx.Param)),
        "score_scale": jax.ShapeDtypeStruct((), jnp.float32),
    }
    axes = {"query_encoder": bert.logical_axes(bert_cfg), "generator": param_logical_axes(abstract_bart),
            "score_scale": ()}  # fmt: skip
    return params, axes


def _specs(params, axes) -> dict[str, P]:
    shardings = sharding.param_shardings(params, axes, sharding.make_mesh(MeshConfig(data=2, fsdp=2, model=2)))
    return {sharding.path_str(path): s.spec for path, s in jax.tree_util.tree_leaves_with_path(shardings)}


def _expected(overrides: dict[str, P]) -> dict[str, P]:
    specs = {f"query_encoder/{k}": v for k, v in BERT_SPECS.items()}
    specs.update({f"generator/{k}": v for k, v in _bart_specs().items()})
    specs["score_scale"] = P()
    return {**specs, **overrides}


TINY_BERT = BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=64)  # fmt: skip
TINY_BART = BartConfig(vocab_size=61, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                       max_position_embeddings=64)  # fmt: skip


def test_real_model_shardings(caplog):
    """BERT-base and BART-large: every dimension divides its mesh axes but BART's vocabulary (50265, odd),
    whose embedding is then split over fsdp only, with one warning naming it."""
    sharding._warn_dropped.cache_clear()
    params, axes = _train_params(BertConfig(), BartConfig())
    with caplog.at_level(logging.WARNING, logger=sharding.__name__):
        assert _specs(params, axes) == _expected({"generator/shared/embedding": P(None, "fsdp")})
        _specs(params, axes)  # the same layout again (an optimizer moment, a later step) warns no more
    (record,) = caplog.records
    assert "generator/shared/embedding" in record.message and "50265" in record.message
    assert "'model'" in record.message


def test_tiny_model_shardings(caplog):
    """Tiny models (vocabulary 61, feed-forward 37): the mesh axes that do not divide are dropped, silently."""
    tiny_mlp = {
        "query_encoder/layers/mlp_in/kernel": P(None, "fsdp", None),
        "query_encoder/layers/mlp_in/bias": P(None, None),
        "query_encoder/layers/mlp_out/kernel": P(None, None, "fsdp"),
        **{f"generator/{stack}/layers/fc1/kernel": P(None, "fsdp", None) for stack in ("encoder", "decoder")},
        **{f"generator/{stack}/layers/fc1/bias": P(None, None) for stack in ("encoder", "decoder")},
        **{f"generator/{stack}/layers/fc2/kernel": P(None, None, "fsdp") for stack in ("encoder", "decoder")},
    }
    vocab = {"query_encoder/embeddings/word": P(None, "fsdp"), "generator/shared/embedding": P(None, "fsdp")}
    with caplog.at_level(logging.WARNING, logger=sharding.__name__):
        assert _specs(*_train_params(TINY_BERT, TINY_BART)) == _expected({**tiny_mlp, **vocab})
    assert not caplog.records


def test_pre_ln_generator_declares_its_final_norms():
    params, axes = _train_params(TINY_BERT, dataclasses.replace(TINY_BART, normalize_before=True))
    specs = _specs(params, axes)
    assert specs["generator/encoder/layer_norm/scale"] == specs["generator/decoder/layer_norm/bias"] == P(None)


def test_parameter_without_declared_axes_is_an_error():
    params, axes = _train_params(TINY_BERT, TINY_BART)
    params["generator"]["shared"]["renamed"] = params["generator"]["shared"].pop("embedding")
    with pytest.raises(ValueError, match="'generator/shared/renamed' has no declared logical axes"):
        _specs(params, axes)
    params, axes = _train_params(TINY_BERT, TINY_BART)
    axes["query_encoder"]["embeddings"]["word"] = ("vocab",)
    with pytest.raises(ValueError, match=r"'query_encoder/embeddings/word' of shape \(61, 32\) declares"):
        _specs(params, axes)


def test_frozen_moments_stay_none():
    """Optimizer moments mirror the parameters, None for a frozen one: laid out like the parameters."""
    params, axes = _train_params(TINY_BERT, TINY_BART)
    moments = {**params, "query_encoder": jax.tree.map(lambda _: None, params["query_encoder"])}
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, model=2))
    shardings = sharding.param_shardings(moments, axes, mesh)
    assert all(s is None for s in jax.tree.leaves(shardings["query_encoder"], is_leaf=lambda x: x is None))
    assert shardings["generator"]["shared"]["embedding"].spec == P(None, "fsdp")
