"""AdamW's update on the CPU in one pass over memory: a C++ kernel (``kernels/adamw.cc``) called
through XLA's FFI, as torch's ``AdamW(fused=True)`` does on the CPU.

XLA:CPU emits no loop with several outputs, so XLA's own form of the update (``optim.adamw_update``)
is three loops per parameter (first moment, second moment, the parameter from both), each re-reading
its inputs: about 11 passes over a parameter's bytes where one loop makes 7 (read the parameter,
gradient and both moments, write the parameter and moments). On BART-base + BERT-base (248M float32
parameters, 2 cores) that was 0.27 s per step against 0.14 s at the memory-traffic bound; the kernel
takes 0.17 s with the clipping norm's pass (experiments/RESULTS.md). Its results alias the
parameter and moments, so a donated step updates them in place.

The kernel is compiled on first use with the host's C++ compiler (``$CXX``, else ``c++`` or
``g++``; jaxlib ships the FFI headers) for the host's CPU, into ``$RAG_JAX_CACHE_DIR`` (default
``~/.cache/rag_jax``), keyed by the source, the compiler, its flags, jax's version and the CPU, and
reused from there (about 3 s once). It serves float32 parameters in a step traced for one CPU device;
TPU and GPU steps (XLA fuses the update into one loop there), multi-device CPU meshes (the simulated
devices of the tests) and other dtypes take ``optim.adamw_update``, as does every step when no
compiler is found (one warning) or ``RAG_JAX_CPU_KERNELS=0``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.models.attention import platform

log = logging.getLogger(__name__)

TARGET = "rag_jax_adamw"
SOURCE = pathlib.Path(__file__).with_name("kernels") / "adamw.cc"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w")
"""``-fno-math-errno`` lets the loop with its square root vectorize (errno is never read);
``-ffp-contract=off`` leaves the multiply-adds the source writes as ``std::fma`` (the ones XLA:CPU
contracts in its form of the update) as the only fused ones, so the results are XLA's bit for bit."""


def cache_dir() -> pathlib.Path:
    """Where compiled kernels are kept: ``$RAG_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/rag_jax``, else
    ``~/.cache/rag_jax``."""
    if os.environ.get("RAG_JAX_CACHE_DIR"):
        return pathlib.Path(os.environ["RAG_JAX_CACHE_DIR"])
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "rag_jax"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cpu_signature() -> str:
    """The host CPU's model and instruction-set flags (the kernel is built with ``-march=native``)."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform as host

        return host.processor() + host.machine()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def build(compiler: str) -> pathlib.Path:
    """The kernel's shared library, compiled with ``compiler`` unless the cache has it (written
    atomically: concurrent builds of the same key are safe). ``RuntimeError`` with the compiler's
    first error line if it fails."""
    include = jax.ffi.include_dir()
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), compiler, *FLAGS, jax.__version__, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    library = cache_dir() / "kernels" / f"adamw-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        partial = pathlib.Path(tmp) / library.name
        command = [compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(partial)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as e:
            raise RuntimeError(f"cannot run the C++ compiler {compiler!r}: {e}") from e
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or [""]
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {errors[0].strip()}")
        os.replace(partial, library)
    return library


_registered: list[pathlib.Path] = []  # the library whose handler XLA has (it refuses a second one)


def _register(library: pathlib.Path) -> None:
    """Loads the kernel and registers it with XLA, once per process."""
    if not _registered:
        handler = ctypes.cdll.LoadLibrary(str(library)).RagJaxAdamW
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
        _registered.append(library)


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA (decided once per process; warns once if
    not)."""
    if os.environ.get("RAG_JAX_CPU_KERNELS", "1") == "0":
        return False
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
        library = build(compiler)
    except RuntimeError as e:
        log.warning("the fused CPU AdamW kernel is unavailable, XLA's update is used instead (slower): %s", e)
        return False
    _register(library)
    return True


def serves(p: jax.Array) -> bool:
    """Whether the kernel updates ``p`` in the step being traced: a float32 parameter, a step for
    the CPU, on a mesh of one device or none (XLA runs a custom call with sharded operands on
    gathered copies: correct, not fast), the kernel available."""
    mesh = jax.sharding.get_abstract_mesh()
    return p.dtype == jnp.float32 and platform() == "cpu" and (mesh.empty or mesh.size == 1) and available()


def adamw_update(p, g, mu, nu, *, factor, rate, bias_corrections, b1: float, b2: float, eps: float,
                 weight_decay: float, skip=None):  # fmt: skip
    """``optim.adamw_update`` by the kernel: the same expressions in the same order, one pass
    (``RuntimeError`` where the kernel is not ``available()``)."""
    if not available():
        raise RuntimeError("the fused CPU AdamW kernel is unavailable (see the warning above)")
    c1, c2 = bias_corrections
    scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in (factor, rate, 1 / jnp.float32(c1), 1 / jnp.float32(c2))])
    skip = jnp.asarray(False if skip is None else skip, jnp.bool_)
    like_p = jax.ShapeDtypeStruct(p.shape, jnp.float32)
    call = jax.ffi.ffi_call(TARGET, (like_p, like_p, like_p), input_output_aliases={0: 0, 2: 1, 3: 2})
    return call(
        p, g.astype(jnp.float32), mu, nu, scalars, skip,
        # the coefficients as jax rounds them: Python's double (1 - b1 included), then float32
        b1=np.float32(b1), one_minus_b1=np.float32(1 - b1), b2=np.float32(b2), one_minus_b2=np.float32(1 - b2),
        eps=np.float32(eps), weight_decay=np.float32(weight_decay),
    )  # fmt: skip
