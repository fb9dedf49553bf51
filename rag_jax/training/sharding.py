"""SPMD layout: the device mesh, one logical-axis rule table, and the shardings it gives.

The mesh has three axes: ``data`` (pure data parallelism: parameters replicated), ``fsdp`` (data
parallel over the batch too, but parameters and optimizer state sharded: ZeRO-3 style) and
``model`` (tensor parallelism: attention heads, feed-forward units and the vocabulary split over it;
size 1 by default). The models declare the logical axes of every parameter where they create it
(``rag_jax.models.bert.logical_axes``, ``rag_jax.models.bart.param_logical_axes``) and name the
logical axes of their large activations; ``LOGICAL_AXIS_RULES`` maps logical names to mesh axes, for
the parameters (``param_shardings``) and, within ``use_mesh``, for the activations. A mesh axis that
does not divide a dimension is dropped for that dimension (the tiny test models have dimensions like
37), so any model runs on any mesh; for a dimension of ``WARN_MIN_DIM`` or more (a real model) a
parameter's dropped axis is logged once, as a warning.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rag_jax.config import MeshConfig
from rag_jax.models.partitioning import DroppedAxis, axis_rules, is_logical_axes, logical_spec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "model")

# logical axis -> mesh axes (None: replicated). The single source of truth for the layout. "norm" names
# the small dimensions kept whole: norm parameters, the biases added to the hidden states, position
# embeddings' rows; "layers" the stacked layers' axis, never split (the scan over layers slices it).
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "docs": None,
    "length": None,
    "layers": None,
    "vocab": "model",
    "embed": "fsdp",
    "heads": "model",
    "mlp": "model",
    "norm": None,
}

WARN_MIN_DIM = 512  # a parameter dimension this large left unsplit by a mesh axis is worth a warning


def path_str(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def maybe_initialize_distributed() -> None:
    """Start multi-host JAX when launched that way; a no-op for single-process runs. Call it before
    anything touches a JAX device.

    * ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
      ``JAX_PROCESS_ID`` in the environment: an explicit launch (any cluster, or several processes on
      one machine). CPU processes use gloo collectives.
    * ``RAG_JAX_DISTRIBUTED=auto``: ``jax.distributed.initialize()`` with jax's cluster detection
      (SLURM, Open MPI, TPU pods, ...).
    """
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # accelerators ignore this
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("RAG_JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, model) mesh of ``cfg`` over ``devices`` (default: all); ``cfg`` None puts every
    device on the data axis."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [-1, 1, 1] if cfg is None else [cfg.data, cfg.fsdp, cfg.model]
    if shape.count(-1) > 1:
        raise ValueError(f"MeshConfig: at most one axis may be -1, got {cfg}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"MeshConfig {cfg}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"MeshConfig {cfg} needs {int(np.prod(shape))} devices, {len(devices)} available")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[None]:
    """Within this block, also inside a traced function, the models' activation constraints apply:
    ``mesh`` is the current (abstract) mesh and ``LOGICAL_AXIS_RULES`` the logical-axis rules
    (``rag_jax.models.partitioning.constrain``)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), axis_rules(LOGICAL_AXIS_RULES):
        yield


@functools.cache
def _warn_dropped(name: str, dropped: DroppedAxis) -> None:
    logger.warning(
        "%s: dimension %d (%s, size %d) is not divisible by mesh axis %r (size %d), so it is not split over it",
        name, dropped.dim, dropped.logical, dropped.size, dropped.mesh_axis, dropped.mesh_axis_size,
    )  # fmt: skip


def param_shardings(params: Any, logical_axes: Any, mesh: Mesh) -> Any:
    """The ``NamedSharding`` of every leaf of ``params`` from its declared logical axes.

    ``logical_axes`` is a pytree of tuples of logical names (``rag_jax.models.partitioning``) with a
    leaf for every parameter path (``"generator/shared/embedding"``); ``params`` may be any tree whose
    leaves have parameter paths, e.g. optimizer moments (None for a frozen parameter stays None). A
    leaf with no declared axes, or with a number of axes other than its number of dimensions, is an error.
    """
    declared = {path_str(path): axes for path, axes in jax.tree_util.tree_flatten_with_path(
        logical_axes, is_leaf=is_logical_axes)[0]}  # fmt: skip

    def one(path, leaf):
        name = path_str(path)
        if name not in declared:
            raise ValueError(f"parameter {name!r} has no declared logical axes (declared: {sorted(declared)})")
        shape = np.shape(leaf)
        if len(declared[name]) != len(shape):
            raise ValueError(f"parameter {name!r} of shape {shape} declares logical axes {declared[name]}")
        spec, dropped = logical_spec(declared[name], shape, LOGICAL_AXIS_RULES, mesh.shape)
        for d in dropped:
            if d.size >= WARN_MIN_DIM:
                _warn_dropped(name, d)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, params)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dim over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """``batch_sharding`` of every leaf of a batch (a ``rag_jax.rag.batches`` type, or any pytree)."""
    return jax.tree.map(lambda x: batch_sharding(mesh, np.ndim(x)), batch)


def process_local(tree: Any) -> Any:
    """``tree`` usable by this process alone (host-side retrieval, a snapshot to embed with): itself in
    a single-process run, the full values gathered from every process otherwise (all must call this)."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host batch on the mesh. Multi-host: each process passes its own slice of the
    global batch (rows process_index * n ... ), assembled into one global array."""

    def place(x, sharding):
        x = np.asarray(x)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(place, batch, batch_shardings(batch, mesh))
