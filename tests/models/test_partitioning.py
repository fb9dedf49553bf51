"""Logical axes: declared for every parameter where it is created, and activation constraints that apply
only under a mesh with axis rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rag_jax.models import bert
from rag_jax.models.bart import Bart, param_logical_axes
from rag_jax.models.configs import BartConfig, BertConfig
from rag_jax.models.partitioning import axis_rules, constrain, is_logical_axes, logical_spec

BERT = BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64, projection_dim=16)  # fmt: skip
BART = BartConfig(vocab_size=61, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
                  normalize_before=True)  # fmt: skip
RULES = {"batch": ("data", "fsdp"), "vocab": "model", "embed": "fsdp", "heads": "model", "mlp": "model"}


def _shapes_and_axes(params, axes):
    """(shape, axes) per parameter path; the two trees must have the same paths."""
    shapes = {path: np.shape(x) for path, x in jax.tree_util.tree_leaves_with_path(params)}
    named = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=is_logical_axes))
    assert shapes.keys() == named.keys()
    return {path: (shapes[path], named[path]) for path in shapes}


@pytest.mark.parametrize("pooler", [False, True])
def test_bert_declares_axes_for_every_parameter(pooler):
    params = jax.eval_shape(lambda: bert.init_params(BERT, jax.random.key(0), pooler=pooler))
    for path, (shape, axes) in _shapes_and_axes(params, bert.logical_axes(BERT, pooler=pooler)).items():
        assert len(axes) == len(shape), path
        assert (axes[0] == "layers") == (jax.tree_util.keystr(path).startswith("['layers']")), path
    assert bert.logical_axes(BERT)["layers"]["query"] == {"kernel": ("layers", "embed", "heads"),
                                                         "bias": ("layers", "heads")}  # fmt: skip


def test_bart_declares_axes_where_variables_are_created():
    """Every ``nnx.Param`` of a (pre-LN) BART, stacked layers included (with a leading "layers" axis)."""
    model = nnx.eval_shape(lambda: Bart(BART, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    axes = param_logical_axes(model)
    for path, (shape, names) in _shapes_and_axes(params, axes).items():
        assert len(names) == len(shape), path
        assert (names[0] == "layers") == ("layers" in jax.tree_util.keystr(path)), path
    assert axes["decoder"]["layers"]["fc1"]["kernel"] == ("layers", "embed", "mlp")
    assert axes["shared"]["embedding"] == ("vocab", "embed")


def test_logical_spec_drops_axes_that_do_not_divide():
    mesh_shape = {"data": 2, "fsdp": 4, "model": 2}
    spec, dropped = logical_spec(("batch", "length", "vocab"), (8, 5, 61), RULES, mesh_shape)
    assert spec == P(("data", "fsdp"), None, None)
    assert [(d.dim, d.mesh_axis) for d in dropped] == [(2, "model")]
    spec, dropped = logical_spec(("batch", "embed"), (6, 32), RULES, mesh_shape)  # 2 * 4 does not divide 6
    assert spec == P("data", "fsdp") and [(d.dim, d.mesh_axis) for d in dropped] == [(0, "fsdp")]
    spec, dropped = logical_spec(("batch", "embed"), (8, 32), RULES, mesh_shape)  # fsdp: used by the batch
    assert spec == P(("data", "fsdp"), None) and not dropped


def test_constrain_is_a_no_op_without_a_mesh_or_rules():
    x = jnp.arange(16.0).reshape(2, 8)
    assert constrain(x, ("batch", "vocab")) is x
    with axis_rules(RULES):
        assert constrain(x, ("batch", "vocab")) is x  # no mesh
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])  # fmt: skip
    with jax.set_mesh(mesh):
        assert constrain(x, ("batch", "vocab")) is x  # no rules
        with axis_rules(RULES):
            y = jax.jit(lambda x: constrain(x * 2, ("batch", "vocab")))(x)
    assert y.sharding.spec == P("data", "model")
    np.testing.assert_array_equal(y, 2 * x)
