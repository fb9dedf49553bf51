"""The plan's human table, its JSON form, and what to change when a program does not fit."""

from __future__ import annotations

import dataclasses
import json

from rag_jax.planning.analysis import ProgramPlan

GiB = 2**30


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(plans: list[ProgramPlan], topology: str) -> str:
    """One row per program: fits, GiB/device (of the device's), FLOPs, estimated time and MFU,
    collective time, compile seconds."""
    head = (f"{'program':<16} {'fits':<4} {'GiB/dev':>14} {'HLO FLOP/dev':>13} {'model FLOP':>11} "
            f"{'HLO/model':>9} {'est s':>9} {'est MFU':>7} {'comm s':>8} {'compile s':>9}")  # fmt: skip
    rows = [f"plan for {topology} ({plans[0].device_kind if plans else '?'} x {plans[0].num_devices if plans else 0})",
            head, "-" * len(head)]  # fmt: skip
    for p in plans:
        total_hlo = p.hlo_flops_per_device * p.num_devices
        rows.append(
            f"{p.name:<16} {'yes' if p.fits else 'NO':<4} "
            f"{p.bytes_per_device / GiB:>6.2f} / {p.device_memory_bytes / GiB:<5.1f} {p.hlo_flops_per_device:>13.3e} "
            f"{p.model_flops:>11.3e} {_fmt(total_hlo / p.model_flops if p.model_flops else None, '.2f'):>9} "
            f"{_fmt(p.est_step_s, '.4f'):>9} {_fmt(p.est_mfu, '.1%'):>7} {_fmt(p.est_collective_s, '.4f'):>8} "
            f"{p.compile_s:>9.1f}"
        )
    for p in plans:
        if p.collectives:
            parts = ", ".join(f"{k} {int(v['count'])}x {v['bytes'] / GiB:.2f} GiB" for k, v in sorted(p.collectives.items()))
            rows.append(f"  {p.name} collectives per device per call: {parts}")
        rows.append(f"  {p.name} settings: {', '.join(f'{k}={v}' for k, v in p.settings.items())}")
    return "\n".join(rows)


def advice(plan: ProgramPlan) -> str:
    """For a program that does not fit: by how much, and the settings that lower the peak."""
    over = (plan.bytes_per_device - plan.device_memory_bytes) / GiB
    parts = ", ".join(f"{kind} {n / GiB:.2f} GiB" for kind, n in plan.memory.items() if kind in ("argument", "temp"))
    what = ("more fsdp (--config.mesh.fsdp, parameters and optimizer state sharded), "
            "--config.train.remat=true (activations recomputed per layer), "
            "a smaller --config.train.batch_size with --config.train.grad_accum_steps to keep the global batch")  # fmt: skip
    if plan.name != "train_step":
        what = "a smaller eval.batch_size or eval.k, or more devices"
    return (f"{plan.name} needs {plan.bytes_per_device / GiB:.2f} GiB per device, {over:.2f} GiB more than the "
            f"{plan.device_kind}'s {plan.device_memory_bytes / GiB:.1f} GiB ({parts}); try {what}")  # fmt: skip


def to_json(plans: list[ProgramPlan], topology: str, config_spec: str) -> str:
    return json.dumps({"topology": topology, "config": config_spec,
                       "programs": [dataclasses.asdict(p) for p in plans]}, indent=1)  # fmt: skip
