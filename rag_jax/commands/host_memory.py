"""Host memory for XLA:CPU: transparent huge pages for the buffers every jitted call allocates.

XLA:CPU allocates a program's whole temporary buffer (102 MiB for the tiny benchmark training step,
2 GiB for a BART-base-sized one) with ``malloc`` on every call. glibc serves such sizes with a fresh
``mmap`` and unmaps them on free, so each call touches new 4 KiB pages: ~27k page faults per tiny
step and, on virtual machines, TLB misses on every pass over the activations. With glibc's
``glibc.malloc.hugetlb=1`` tunable, malloc asks for transparent huge pages (``madvise``), which took
the tiny training step from 0.18 to 0.10 s on the 2-core CPU VM of ``experiments/RESULTS.md``.

Tunables are read when a process starts, so ``reexec_with_huge_pages`` runs the program again with
the tunable added (once: the new process sees it set). The ``rag-jax`` subcommands that run jitted
work do this first thing (``cli.HUGE_PAGE_COMMANDS``); ``RAG_JAX_HUGE_PAGES=0`` turns it off.
Elsewhere than Linux, or where the kernel has transparent huge pages off (``never``), it does nothing.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
OPT_OUT = "RAG_JAX_HUGE_PAGES"


def _thp_available() -> bool:
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def environment_with_huge_pages(environ: dict[str, str]) -> dict[str, str] | None:
    """``environ`` with the tunable added to ``GLIBC_TUNABLES``, or None when there is nothing to do
    (already set, opted out, not Linux, or no transparent huge pages)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(OPT_OUT) == "0" or "glibc.malloc.hugetlb=" in tunables:
        return None
    if not sys.platform.startswith("linux") or not _thp_available():
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, TUNABLE]))}


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command line with the tunable set (see the module docstring);
    returns without doing anything when the environment needs no change. Call it before any work."""
    env = environment_with_huge_pages(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
