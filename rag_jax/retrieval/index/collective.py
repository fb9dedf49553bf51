"""Searches that span the processes of a multi-host run: every process brings its own queries (any number),
and the search runs on all of them at once (``jax.experimental.multihost_utils.process_allgather``)."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def gather_queries(q_QxD: np.ndarray) -> tuple[np.ndarray, slice]:
    """Every process's queries ``[P * W, D]`` (each padded with zero rows to the largest count W, in
    process order) and the rows of this process's own. Collective: every process calls it."""
    counts = multihost_utils.process_allgather(np.array([q_QxD.shape[0]], np.int64)).reshape(-1)
    width, me = int(counts.max()), jax.process_index()
    padded = np.zeros((width, q_QxD.shape[1]), np.float32)
    padded[: q_QxD.shape[0]] = q_QxD
    every_q = multihost_utils.process_allgather(padded).reshape(-1, q_QxD.shape[1])
    return every_q, slice(me * width, me * width + q_QxD.shape[0])
