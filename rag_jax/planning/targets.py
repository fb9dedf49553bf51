"""Accelerator targets for ahead-of-time planning: published per-chip figures and abstract devices.

``target("v5e:2x4")`` gives the 8 devices of a TPU v5e 2x4 slice as compile-only devices
(``jax.experimental.topologies``, from ``libtpu``: no TPU needed), with the chip's figures;
``target("h100:8")`` the 8 GPUs of one H100 node (from the CUDA plugin and a shipped
``GpuTargetConfig``: no GPU needed); ``target("cpu:N")`` N of this host's CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N`` gives more than one).

The figures are the vendors' published peak numbers (dense bfloat16 matmul FLOP/s, HBM capacity and
bandwidth, chip-to-chip bandwidth one way per chip), so every estimate made from them is an upper
bound on speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
from importlib import resources

import jax

from rag_jax.errors import ConfigError, UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one accelerator chip."""

    name: str
    platform: str  # "tpu" | "cuda" | "cpu"
    memory_bytes: int  # HBM per chip
    peak_flops: float | None  # dense bfloat16 FLOP/s
    hbm_bytes_per_s: float | None
    interconnect_bytes_per_s: float | None  # ICI / NVLink, one direction, per chip
    source: str  # where the figures come from


CHIPS = {
    # docs.cloud.google.com/tpu/docs/<version>: bf16 peak, HBM capacity and bandwidth, ICI bidirectional / 2
    "v4": Chip("TPU v4", "tpu", 32 * GiB, 275e12, 1228e9, 150e9, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", "tpu", 16 * GiB, 197e12, 819e9, 200e9, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", "tpu", 95 * GiB, 459e12, 2765e9, 300e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", "tpu", 32 * GiB, 918e12, 1638e9, 400e9, "cloud.google.com/tpu/docs/v6e"),
    # NVIDIA data sheets (SXM): dense BF16 tensor-core peak, HBM, NVLink 900 / 600 GB/s bidirectional / 2
    "h100": Chip("H100 SXM 80GB", "cuda", 80 * GiB, 989e12, 3.35e12, 450e9, "nvidia.com H100 data sheet"),
    "h200": Chip("H200 SXM 141GB", "cuda", 141 * 10**9, 989e12, 4.8e12, 450e9, "nvidia.com H200 data sheet"),
    "a100": Chip("A100 SXM 80GB", "cuda", 80 * GiB, 312e12, 2.039e12, 300e9, "nvidia.com A100 data sheet"),
}
TOPOLOGY_HELP = "v5e:2x4 | v5e:16x16 | v5p:2x2x2 | v4:2x2x2 | v6e:2x4 | h100:8 | h200:8 | a100:8 | cpu:N"


@dataclasses.dataclass(frozen=True)
class Target:
    """A named topology: its chip and its devices (compile-only for TPU and GPU)."""

    topology: str
    chip: Chip
    devices: tuple

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind


def parse(topology: str) -> tuple[str, str]:
    """``"v5e:2x4"`` -> ``("v5e", "2x4")``; a ConfigError naming the accepted forms otherwise."""
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", topology.strip().lower())
    if not m or (m.group(1) not in CHIPS and m.group(1) != "cpu"):
        raise ConfigError(f"unknown topology {topology!r}; expected one of {TOPOLOGY_HELP}", what="--topology")
    chip, shape = m.groups()
    if CHIPS.get(chip, None) and CHIPS[chip].platform == "cuda" and "x" in shape:
        raise ConfigError(f"a GPU topology is <gpu>:<count>, e.g. h100:8; got {topology!r}", what="--topology")
    return chip, shape


def target(topology: str) -> Target:
    """The devices and chip figures of ``topology`` (see the module docstring)."""
    name, shape = parse(topology)
    if name == "cpu":
        return _cpu_target(topology, int(shape))
    chip = CHIPS[name]
    if chip.platform == "tpu":
        return Target(topology, chip, tuple(_tpu_devices(f"{name}:{shape}")))
    return Target(topology, chip, tuple(_gpu_devices(name, int(shape))))


def _cpu_target(topology: str, n: int) -> Target:
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise UserError(f"{topology}: this process has {len(devices)} CPU device(s); set "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting it")  # fmt: skip
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    chip = Chip("host CPU", "cpu", memory, None, None, None, "this host (memory shared by the CPU devices)")
    return Target(topology, chip, tuple(devices[:n]))


def _tpu_devices(name: str) -> list:
    """Compile-only TPU devices from libtpu (``requirements-aot.txt``); its warnings about the missing
    TPU environment (accelerator type, worker hostnames) are harmless and silenced."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other jax processes may hold libtpu's lock
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise UserError("TPU planning needs libtpu: pip install -r requirements-aot.txt "
                        '(jax[tpu] at this jax version)') from None  # fmt: skip
    try:
        with native_stderr_silenced():
            return topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    except Exception as e:  # libtpu's own error type
        raise UserError(f"libtpu cannot describe topology {name!r}: {str(e).splitlines()[0]}") from e


def _gpu_devices(name: str, count: int) -> list:
    """Compile-only GPUs of one node from the CUDA plugin and the chip's shipped ``GpuTargetConfig``
    (``rag_jax/planning/gpu_targets/<name>.txtpb``)."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    if "xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
        # without a GPU, XLA cannot autotune Triton GEMM tiles and fails on some shapes ("Couldn't find
        # output tile sizes"); cuBLAS GEMMs need no autotuning. Read when the plugin starts, i.e. below.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()
    from jax.experimental import topologies

    proto = resources.files(__package__).joinpath("gpu_targets", f"{name}.txtpb").read_text()
    try:
        with native_stderr_silenced():
            topology = topologies.get_topology_desc(
                platform="cuda", topology_name=f"{name}x{count}", target_config=proto, topology=f"1x1x{count}"
            )
    except Exception as e:
        raise UserError(f"GPU planning needs the CUDA plugin (pip install 'jax[cuda12]=={jax.__version__}'; "
                        f"no GPU needed): {str(e).splitlines()[0]}") from e  # fmt: skip
    return topology.devices


@contextlib.contextmanager
def native_stderr_silenced():
    """The plugins' own start-up notes (written by C++ to file descriptor 2: libtpu's missing
    accelerator type and worker hostnames, which do not matter for compiling) hidden, unless the jax
    logger is at INFO or below (``--verbose``)."""
    if logging.getLogger("jax").getEffectiveLevel() <= logging.INFO:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5p": "v5p", "TPU v6 lite": "v6e",
                "NVIDIA H100": "h100", "NVIDIA H200": "h200", "NVIDIA A100": "a100"}  # fmt: skip


def attached_target() -> Target:
    """This process's own devices (a real accelerator, e.g. for a measured step beside its plan), with
    the figures of the chip whose name its ``device_kind`` starts with (the host's for CPU devices)."""
    devices = jax.devices()
    kind = devices[0].device_kind
    chip = next((CHIPS[name] for prefix, name in DEVICE_KINDS.items() if kind.startswith(prefix)), None)
    if chip is None:
        return _cpu_target(f"cpu:{len(devices)}", len(devices)) if devices[0].platform == "cpu" else \
            Target(f"local:{len(devices)}", Chip(kind, devices[0].platform, 0, None, None, None, "unknown"), tuple(devices))
    return Target(f"local:{len(devices)}", chip, tuple(devices))
