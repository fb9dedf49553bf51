"""Rematerialisation (gradient checkpointing) of one scanned layer, by policy name.

``"none"`` stores every activation the backward pass needs; the others wrap the layer body in
``jax.checkpoint``, which stores only what the policy saves and recomputes the rest in the backward pass:

- ``"full"``: nothing inside the layer (only its input is kept, per layer, by the scan);
- ``"dots_saveable"``: every matmul output (projections, attention scores and weighted values);
- ``"dots_with_no_batch_dims_saveable"``: the matmuls without batch dimensions, i.e. the dense
  projections, not the attention products (whose batch and head axes are batch dimensions).
"""

from __future__ import annotations

import jax

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")

_SAVEABLE = {
    "full": None,  # jax.checkpoint's default: save nothing
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(remat: str) -> str:
    """``remat`` if it names a policy of ``REMAT_POLICIES``, else a ``ValueError`` naming them."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not one of {REMAT_POLICIES}")
    return remat


def rematerialised(layer_fn, remat: str, *, in_scan: bool = True):
    """``layer_fn`` checkpointed by the policy ``remat`` (unchanged for ``"none"``). A scan body is not
    CSE'd across iterations, so ``prevent_cse`` is off there; a layer called in a Python loop
    (``in_scan=False``) keeps it on, or XLA could merge the recomputation with the forward pass."""
    if check_remat(remat) == "none":
        return layer_fn
    return jax.checkpoint(layer_fn, prevent_cse=not in_scan, policy=_SAVEABLE[remat])
