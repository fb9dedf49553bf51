"""Synthetic clustered embeddings with varying norms, for index tests and benchmarks.

Points are ``scale * (center + noise)``: centers ~ N(0, I/D) (norm ~1), noise ~ N(0, spread^2 I/D),
and a per-point ``scale = exp(N(0, norm_sigma^2))``, so norms vary as they do for DPR passage
vectors and inner-product search differs from cosine search. With the default spread (1.2 at
D = 128, ``default_spread``) clusters overlap: at 100k x 128 an IVF index over sqrt(N) lists needs ~5%
of the lists for recall@10 0.95 (at spread < 1 one list is enough, which would flatter every
partitioning method). Queries are ``center + noise``
of random clusters. Generated in fixed blocks from seeded generators: the same arguments give the
same arrays, and memory stays at the output plus one block.
"""

from __future__ import annotations

import numpy as np

BLOCK = 65536


def _centers(num_clusters: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0])
    return (rng.standard_normal((num_clusters, dim)) / np.sqrt(dim)).astype(np.float32)


def default_num_clusters(n: int) -> int:
    return max(8, int(2 * np.sqrt(n)))


def default_spread(dim: int) -> float:
    """1.2 at D = 128, growing as D^(1/4): the cross-cluster noise in an inner product shrinks as
    spread^2 / sqrt(D), so this keeps the clusters about as entangled at any D."""
    return 1.2 * (dim / 128) ** 0.25


def clustered_vectors(
    n: int,
    dim: int,
    *,
    num_clusters: int | None = None,
    spread: float | None = None,
    norm_sigma: float = 0.25,
    seed: int = 0,
) -> np.ndarray:
    """``[n, dim]`` float32 corpus vectors (see the module docstring)."""
    num_clusters = num_clusters or default_num_clusters(n)
    spread = spread or default_spread(dim)
    centers = _centers(num_clusters, dim, seed)
    out = np.empty((n, dim), np.float32)
    for b, start in enumerate(range(0, n, BLOCK)):
        rng = np.random.default_rng([seed, 1, b])
        m = min(BLOCK, n - start)
        block = centers[rng.integers(num_clusters, size=m)]
        block += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(spread / np.sqrt(dim))
        block *= np.exp(rng.normal(0.0, norm_sigma, size=(m, 1))).astype(np.float32)
        out[start : start + m] = block
    return out


def clustered_queries(
    num_queries: int, dim: int, *, n: int, num_clusters: int | None = None, spread: float | None = None, seed: int = 0
) -> np.ndarray:
    """``[num_queries, dim]`` float32 queries near the clusters of ``clustered_vectors(n, dim, ...)``
    with the same ``n``, ``num_clusters`` and ``seed``."""
    num_clusters = num_clusters or default_num_clusters(n)
    spread = spread or default_spread(dim)
    centers = _centers(num_clusters, dim, seed)
    rng = np.random.default_rng([seed, 2])
    q = centers[rng.integers(num_clusters, size=num_queries)]
    return q + rng.standard_normal((num_queries, dim), dtype=np.float32) * np.float32(spread / np.sqrt(dim))


def low_rank_vectors(n: int, dim: int = 32, rank: int = 6, *, noise: float = 0.3, norm_sigma: float = 0.7,
                     seed: int = 0, basis_seed: int = 123) -> np.ndarray:  # fmt: skip
    """Data unlike ``clustered_vectors``: ``n`` rows on a ``rank``-dimensional subspace (a fixed random
    basis from ``basis_seed``) plus isotropic ``noise``, each scaled by a log-normal norm (``norm_sigma``:
    heavy-tailed norms). Queries: the same call with another ``seed``."""
    basis = np.random.default_rng(basis_seed).standard_normal((rank, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, rank)).astype(np.float32) @ basis + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x * rng.lognormal(0.0, norm_sigma, (n, 1)).astype(np.float32)
