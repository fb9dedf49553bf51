"""rag_jax: Retrieval-Augmented Generation (Lewis et al. 2020) in JAX/Flax."""
