"""The ``rag-jax`` command (also ``python -m rag_jax``); each subcommand lives in ``rag_jax.commands``.

Subcommands that take a run config (``train``, ``eval``) also accept ``--config.<field>=<value>``
overrides; any other unknown argument is an error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rag_jax.commands import host_memory

COMMAND_MODULES = ("model_io", "retrieval", "train", "quickstart")
HUGE_PAGE_COMMANDS = ("quickstart", "train", "eval", "embed")  # subcommands whose work is jitted steps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rag-jax", description="Retrieval-Augmented Generation in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"rag_jax.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``rag-jax`` command. Run as a program (``argv`` None), the subcommands that run jitted work
    (``HUGE_PAGE_COMMANDS``) first re-execute themselves with huge pages for XLA:CPU's buffers
    (``rag_jax.commands.host_memory``); the others skip the second start-up (a second ~1.5 s of imports)."""
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in HUGE_PAGE_COMMANDS:
        host_memory.reexec_with_huge_pages()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    overrides = [a for a in unknown if a.startswith("--config.")]
    rest = [a for a in unknown if not a.startswith("--config.")]
    if rest or (overrides and not getattr(args, "overrides_allowed", False)):
        parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
    args.overrides = overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
