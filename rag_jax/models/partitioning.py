"""Logical axes: the names models give the dimensions of their parameters and large activations.

A model names each dimension with a logical axis ("batch", "length", "vocab", "embed", "heads", "mlp",
"norm", "layers", "docs"); which mesh axes a logical axis is split over is not the model's business.
A run that lays the model out on a mesh installs rules, logical axis -> mesh axes, with ``axis_rules``
and traces under ``jax.set_mesh``; ``logical_spec`` turns logical axes into a ``PartitionSpec`` with
those rules, and ``constrain`` pins an activation's layout with it. Without a mesh or without rules
(unit tests, decoding on one device) ``constrain`` returns its input unchanged.

A mesh axis that does not divide a dimension, or that an earlier dimension already uses, is left out
for that dimension (the tiny test models have dimensions like 37), so any model runs on any mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec as P

LogicalAxes = tuple[str | None, ...]
"""The logical axis of each dimension of an array (None: never split)."""

Rules = Mapping[str, str | tuple[str, ...] | None]
"""Logical axis -> the mesh axis (or axes, in order) it is split over; None: replicated."""

_rules: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("rag_jax_axis_rules", default=None)


def is_logical_axes(x) -> bool:
    """True for a leaf of a logical-axes pytree (a tuple of names): ``is_leaf`` for ``jax.tree`` functions."""
    return isinstance(x, tuple)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
    """Within the block, ``constrain`` maps logical axes to mesh axes with ``rules``."""
    token = _rules.set(rules)
    try:
        yield
    finally:
        _rules.reset(token)


@dataclasses.dataclass(frozen=True)
class DroppedAxis:
    """A mesh axis a rule asks for that does not divide dimension ``dim`` (size ``size``) of an array."""

    dim: int
    logical: str
    size: int
    mesh_axis: str
    mesh_axis_size: int


def logical_spec(
    logical: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh_shape: Mapping[str, int]
) -> tuple[P, list[DroppedAxis]]:
    """The ``PartitionSpec`` of an array of ``shape`` whose dimensions have the ``logical`` axes, and the
    mesh axes left out because they do not divide their dimension. Mesh axes of size 1 and mesh axes an
    earlier dimension already uses are left out too (not reported)."""
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not fit shape {tuple(shape)}")
    used: set[str] = set()
    entries = []
    dropped = []
    for dim, (name, size) in enumerate(zip(logical, shape)):
        rule = rules.get(name) if name else None
        kept: list[str] = []
        split = 1
        for axis in (rule,) if isinstance(rule, str) else tuple(rule or ()):
            n = mesh_shape[axis]
            if axis in used or n == 1:
                continue
            if size % (split * n):
                dropped.append(DroppedAxis(dim, name, size, axis, n))
                continue
            kept.append(axis)
            split *= n
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*entries), dropped


def constrain(x: jax.Array, logical: LogicalAxes) -> jax.Array:
    """``x`` laid out as its ``logical`` axes say under the current mesh and rules
    (``jax.lax.with_sharding_constraint``); ``x`` itself when no mesh is set or no rules are installed."""
    rules = _rules.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    spec, _ = logical_spec(logical, x.shape, rules, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


# Logical axes of the activations the models constrain.
HIDDEN: LogicalAxes = ("batch", "length", "embed")  # hidden states between layers [B, S, D]
LOGITS: LogicalAxes = ("batch", "length", "vocab")  # output logits [B, T, V]
# Embedding tables [N, D] as read by a lookup or the tied output projection: each row whole, the rows of
# a vocabulary split (over "model"). A table stored split along D ("embed" over "fsdp") is gathered
# first: a lookup into it would give rows split along D, which the partitioner cannot re-split by batch
# (the hidden states' layout) without gathering them whole anyway.
VOCAB_TABLE: LogicalAxes = ("vocab", None)  # token embeddings [V, D]
POSITION_TABLE: LogicalAxes = (None, None)  # position (and token type) embeddings [P, D]
