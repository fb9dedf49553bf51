"""What a compiled program costs on a target: per-device memory, FLOPs, collectives, and a roofline
estimate of its time.

* Memory: XLA's ``memory_analysis()`` of the compiled program, per device; the peak is arguments +
  outputs + temporaries - what outputs alias (donated inputs), against the chip's memory.
* FLOPs: the traced matmul FLOPs (``flops.traced_matmul_flops``: loops counted as they run, remat
  recompute included) divided evenly over the devices, beside XLA's ``cost_analysis()`` figure, which
  counts every loop body once.
* Collectives: every all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute of
  the compiled HLO, with its result bytes, times the trips of the loops around it (a loop's trip count
  is XLA's ``known_trip_count`` where the HLO carries it, else the integer bound in its condition, else
  the program's bound; decoding loops that stop early run fewer).
* Estimate: ``max(FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth)`` per device, the HBM bytes being
  the larger of XLA's ``bytes accessed``, which counts a loop body once, and the weights a decoding
  loop reads at every token times its bound (both lower bounds on the traffic, as the time estimate is
  a lower bound); the collectives' time is their bytes over the chip's one-way interconnect bandwidth
  (an all-reduce moves its bytes twice), reported beside it, not added (XLA overlaps them with compute
  where it can). MFU = model FLOPs / (devices x peak x estimated time): an upper bound, as the estimate
  is a lower bound on time.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import time
import warnings

from rag_jax.planning.flops import traced_matmul_flops
from rag_jax.planning.programs import Program
from rag_jax.planning.targets import Target

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_OP = re.compile(r"= (.*?) ((?:" + "|".join(COLLECTIVES) + r")(?:-start)?)\(")


@dataclasses.dataclass
class ProgramPlan:
    """The figures of one compiled program (the fields of ``rag-jax plan --out``)."""

    name: str
    fits: bool
    device_kind: str
    num_devices: int
    bytes_per_device: int  # peak
    device_memory_bytes: int
    memory: dict  # bytes per device by kind
    hlo_flops_per_device: float
    xla_cost_flops_per_device: float | None
    model_flops: float
    collectives: dict  # name -> {"count", "bytes"} per device, loop trips included
    largest_collectives: list  # the biggest by bytes, with their jax op_name
    est_compute_s: float | None
    est_memory_s: float | None
    est_collective_s: float | None
    est_step_s: float | None
    est_mfu: float | None
    compile_s: float
    settings: dict


def _array_bytes(shape_text: str) -> list[int]:
    return [_DTYPE_BYTES.get(dtype, 4) * math.prod(int(n) for n in dims.split(",") if n)
            for dtype, dims in _ARRAY.findall(shape_text)]  # fmt: skip


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """The HLO module's computations (name -> instruction lines) and the entry computation's name."""
    comps, entry, name = {}, "", None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            header = line.split("(")[0].split()
            name = header[-1].lstrip("%")
            if header[0] == "ENTRY":
                entry = name
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps, entry


def _trip_count(condition: list[str], default: int) -> int:
    """A loop's trip count from its condition: the largest s32 constant it compares with, else
    ``default`` (the program's bound: a decoding loop stops on a computed condition)."""
    bounds = [int(n) for line in condition for n in re.findall(r"s32\[\] constant\((\d+)\)", line)]
    return max(bounds, default=default)


def _collective_ops(hlo: str, default_trips: int = 1):
    """``(kind, runs per call, result bytes, op_name)`` of every collective instruction of the module,
    each computation's runs being the product of the trips of the loops around it."""
    comps, entry = _computations(hlo)
    runs: collections.Counter = collections.Counter()

    def visit(name: str, times: int, depth: int = 0) -> None:
        if name not in comps or depth > 64:
            return
        runs[name] += times
        for line in comps[name]:
            callees = _CALLEE.findall(line) + [c.strip().lstrip("%") for group in _CALLEE_LISTS.findall(line)
                                                for c in group.split(",") if c.strip()]  # fmt: skip
            trips = 1
            if " while(" in line:
                known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)  # GPU's backend config
                cond = re.search(r"condition=%?([\w.\-]+)", line)
                if known:
                    trips = int(known.group(1))
                else:
                    trips = _trip_count(comps.get(cond.group(1), []), default_trips) if cond else default_trips
            for callee in callees:
                visit(callee, times * trips, depth + 1)

    visit(entry, 1)
    for name, times in runs.items():
        for line in comps[name]:
            m = _OP.search(line)
            if m:
                sizes = _array_bytes(m.group(1))
                nbytes = max(sizes, default=0) if m.group(2).endswith("-start") else sum(sizes)
                source = re.search(r'op_name="([^"]*)"', line)
                yield m.group(2).removesuffix("-start"), times, nbytes, source.group(1) if source else ""


def collectives(hlo: str, default_trips: int = 1) -> dict[str, dict[str, float]]:
    """Count and result bytes of each collective kind per device, every computation weighted by how
    many times it runs (nested loop trips multiplied)."""
    totals: dict[str, dict[str, float]] = {}
    for kind, times, nbytes, _ in _collective_ops(hlo, default_trips):
        entry = totals.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += times
        entry["bytes"] += times * nbytes
    return totals


def largest_collectives(hlo: str, default_trips: int = 1, n: int = 8) -> list[dict]:
    """The ``n`` collectives moving the most bytes per call (loop trips included), with the jax
    operation they come from (HLO metadata ``op_name``): where to look when communication dominates."""
    ops = sorted(_collective_ops(hlo, default_trips), key=lambda op: -op[1] * op[2])[:n]
    return [{"kind": kind, "count": times, "bytes": times * nbytes, "op_name": source} for kind, times, nbytes, source in ops]


_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED.*?required for [\w ]+\(([\d.]+)([KMGT])\)", re.S)


def _compile(program: Program):
    """``(traced, compiled)``; ``compiled`` is the compiler's out-of-memory error's required bytes (an
    int) where it refuses a program that cannot fit (TPU's compiler does, before any memory analysis)."""
    with warnings.catch_warnings():  # abstract arguments: nothing to donate yet
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        traced = program.function.trace(*program.args)
        try:
            return traced, traced.lower().compile()
        except Exception as e:  # jax.errors.JaxRuntimeError
            m = _OUT_OF_MEMORY.search(str(e))
            if not m:
                raise
            size, unit = m.groups()
            return traced, int(float(size) * 1024 ** ("KMGT".index(unit) + 1))


def analyse(program: Program, target: Target, hlo_dir: str | None = None) -> ProgramPlan:
    """Trace, lower and compile ``program`` for ``target`` and measure it (module docstring); with
    ``hlo_dir``, the compiled HLO is written there as ``<program>.hlo.txt``. A program the compiler
    refuses for lack of device memory is reported as not fitting, with the temporaries it asked for."""
    start = time.perf_counter()
    traced, compiled = _compile(program)
    compile_s = time.perf_counter() - start
    n, chip = target.num_devices, target.chip
    flops_per_device = traced_matmul_flops(traced.jaxpr, program.while_trips) / n
    if isinstance(compiled, int):
        return ProgramPlan(
            name=program.name, fits=False, device_kind=target.device_kind, num_devices=n, bytes_per_device=compiled,
            device_memory_bytes=chip.memory_bytes, memory={"temp": compiled},  # all the compiler says
            hlo_flops_per_device=flops_per_device,
            xla_cost_flops_per_device=None, model_flops=program.model_flops, collectives={}, largest_collectives=[],
            est_compute_s=None, est_memory_s=None, est_collective_s=None, est_step_s=None, est_mfu=None,
            compile_s=compile_s, settings=program.settings,
        )  # fmt: skip
    mem = compiled.memory_analysis()
    memory = {kind: int(getattr(mem, f"{kind}_size_in_bytes", 0) or 0)
              for kind in ("argument", "output", "alias", "temp", "generated_code")}  # fmt: skip
    peak = memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    hlo = compiled.as_text()
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{program.name}.hlo.txt"), "w", encoding="utf-8") as f:
            f.write(hlo)
    comms = collectives(hlo, program.while_trips)
    est_compute = est_memory = est_comm = est = mfu = None
    if chip.peak_flops:
        est_compute = flops_per_device / chip.peak_flops
        # HBM traffic: XLA's count (loop bodies once) or the weights every loop trip reads, the larger
        streamed = max(cost.get("bytes accessed") or 0.0, program.while_trips * program.bytes_per_trip)
        est_memory = streamed / chip.hbm_bytes_per_s if streamed else None
        est = max(est_compute, est_memory or 0.0)
        moved = sum(v["bytes"] * (2 if k == "all-reduce" else 1) for k, v in comms.items())
        est_comm = moved / chip.interconnect_bytes_per_s if n > 1 else 0.0
        mfu = program.model_flops / (n * chip.peak_flops * est) if est else None
    return ProgramPlan(
        name=program.name, fits=peak <= chip.memory_bytes, device_kind=target.device_kind, num_devices=n,
        bytes_per_device=peak, device_memory_bytes=chip.memory_bytes, memory=memory,
        hlo_flops_per_device=flops_per_device, xla_cost_flops_per_device=cost.get("flops"),
        model_flops=program.model_flops, collectives=comms, largest_collectives=largest_collectives(hlo, program.while_trips),
        est_compute_s=est_compute, est_memory_s=est_memory, est_collective_s=est_comm, est_step_s=est, est_mfu=mfu,
        compile_s=compile_s, settings=program.settings,
    )  # fmt: skip
