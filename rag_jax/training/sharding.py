"""SPMD layout: the device mesh, one logical-axis rule table, and the shardings it gives.

The mesh has three axes: ``data`` (pure data parallelism: parameters replicated), ``fsdp`` (data
parallel over the batch too, but parameters and optimizer state sharded: ZeRO-3 style) and
``model`` (tensor parallelism; size 1 by default, room to grow). Every parameter gets logical
axis names from its path (``PARAM_LOGICAL_AXES``); ``LOGICAL_AXIS_RULES`` maps logical names to
mesh axes. A mesh axis that does not divide a dimension is dropped for that dimension (the tiny
test models have dimensions like 37), so any model runs on any mesh.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rag_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "model")

# logical axis -> mesh axes (None: replicated). The single source of truth for the layout.
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

# Parameter path (the "/"-joined pytree keys) -> logical axes of its dimensions, first match wins;
# anything unmatched (norm scales and biases, output biases, the learned score scale: a scalar) is
# replicated. Examples:
# "generator/encoder/layers/self_attn/q_proj/kernel", "query_encoder/layers/query/kernel" (stacked BART
# and BERT layers: one more leading dim, named "layers", which is never sharded: the scan over layers
# slices it).
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embeddings/word$|shared/embedding$", ("vocab", "embed")),
    (r"embeddings/(position|token_type)$|embed_positions/embedding$", ("norm", "embed")),
    (r"(query|key|value|q_proj|k_proj|v_proj)/kernel$", ("embed", "heads")),
    (r"(query|key|value|q_proj|k_proj|v_proj)/bias$", ("heads",)),
    (r"(attn_out|out_proj)/kernel$", ("heads", "embed")),
    (r"(mlp_in|fc1)/kernel$", ("embed", "mlp")),
    (r"(mlp_in|fc1)/bias$", ("mlp",)),
    (r"(mlp_out|fc2)/kernel$", ("mlp", "embed")),
    (r"(projection|pooler)/kernel$", ("embed", "norm")),
)


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


def logical_axes_of(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a parameter (or of its optimizer moments, whose paths end the same way).
    A leading extra dim (stacked, scanned layers) is named "layers"."""
    path = re.sub(r"/(value|raw_value)$", "", path)
    axes = next((axes for pattern, axes in PARAM_LOGICAL_AXES if re.search(pattern, path)), ())
    if ndim == len(axes) + 1:
        return ("layers",) + axes
    return axes if ndim == len(axes) else (None,) * ndim


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec from logical axes, dropping mesh axes that do not divide the dim or that an
    earlier dim already uses."""
    used: set[str] = set()
    entries = []
    for name, dim in zip(logical, shape):
        rule = LOGICAL_AXIS_RULES.get(name) if name else None
        axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        kept = []
        size = 1
        for axis in axes:
            n = mesh.shape[axis]
            if axis in used or n == 1 or dim % (size * n):
                continue
            kept.append(axis)
            size *= n
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*entries)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of a parameter (or optimizer-state) pytree."""

    def one(path, leaf):
        shape = np.shape(leaf)
        return NamedSharding(mesh, spec_for(logical_axes_of(path_str(path), len(shape)), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dim over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """``batch_sharding`` of every leaf of a batch (a ``rag_jax.rag.batches`` type, or any pytree)."""
    return jax.tree.map(lambda x: batch_sharding(mesh, np.ndim(x)), batch)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host batch on the mesh. Multi-host: each process passes its own slice of the
    global batch (rows process_index * n ... ), assembled into one global array."""

    def place(x, sharding):
        x = np.asarray(x)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(place, batch, batch_shardings(batch, mesh))
