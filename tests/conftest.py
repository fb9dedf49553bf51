"""Test-wide settings: 8 simulated CPU devices and float32 matmuls at full precision; ``--attention``.

XLA_FLAGS must be set before jax is imported anywhere, so it is set here, at collection time.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_addoption(parser):
    parser.addoption(
        "--attention", choices=("auto", "dot_product"), default="auto",
        help="dot_product: attention through jax.nn.dot_product_attention wherever dropout allows, on CPU "
        "too (rag_jax.models.attention), e.g. to run the transformers parity tests through it",
    )  # fmt: skip


def pytest_configure(config):
    if config.getoption("--attention") == "dot_product":
        from rag_jax.models import attention

        attention.EXPLICIT_BACKENDS = ()
