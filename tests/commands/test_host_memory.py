"""The huge-pages re-execution of the rag-jax command (rag_jax.commands.host_memory)."""

import os
import subprocess
import sys

import pytest

from rag_jax.commands import host_memory

LINUX_WITH_THP = sys.platform.startswith("linux") and host_memory._thp_available()


@pytest.mark.skipif(not LINUX_WITH_THP, reason="needs Linux with transparent huge pages")
def test_environment_adds_the_tunable_once_and_keeps_other_tunables():
    assert host_memory.environment_with_huge_pages({})["GLIBC_TUNABLES"] == host_memory.TUNABLE
    env = host_memory.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{host_memory.TUNABLE}", "X": "1"}
    assert host_memory.environment_with_huge_pages(env) is None  # already set: no second re-execution
    # the user chose a value: kept
    assert host_memory.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None


def test_opt_out():
    assert host_memory.environment_with_huge_pages({host_memory.OPT_OUT: "0"}) is None


@pytest.mark.skipif(not LINUX_WITH_THP, reason="needs Linux with transparent huge pages")
def test_reexecution_runs_the_same_command_line_with_the_tunable():
    code = (
        "import os, sys; from rag_jax.commands import host_memory; "
        "print('start', flush=True); host_memory.reexec_with_huge_pages(); "
        "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", code, "a", "--b"], env=env, capture_output=True, text=True, check=True)
    # the program started twice (before and after the exec) and the second run saw the tunable
    assert out.stdout.splitlines() == ["start", "start", f"{host_memory.TUNABLE} ['a', '--b']"]
