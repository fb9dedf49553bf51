"""Activation functions against transformers' ``ACT2FN`` (PyTorch), values and gradients, float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax.models.activations import ACTIVATIONS, activation

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# dense around 0, where the functions bend, out to where erf / tanh saturate; no point falls on a kink
# (0 for the relus, 6 for relu6), where the two libraries pick different subgradients
X = np.concatenate([np.linspace(-12.0, 12.0, 2000), [-80.0, -30.0, 30.0, 80.0]]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_matches_transformers(name):
    reference = transformers.activations.ACT2FN[name]
    x_torch = torch.tensor(X, requires_grad=True)
    y_torch = reference(x_torch)
    (grad_torch,) = torch.autograd.grad(y_torch.sum(), x_torch)
    fn = activation(name)
    y, grad = jax.vmap(jax.value_and_grad(fn))(jnp.asarray(X))
    np.testing.assert_allclose(np.asarray(y), y_torch.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), grad_torch.numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_activation_names_the_supported_ones():
    with pytest.raises(ValueError, match="'gelu'"):
        activation("gelu_typo")
