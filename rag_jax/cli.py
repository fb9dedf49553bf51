"""The ``rag-jax`` command (also ``python -m rag_jax``); each subcommand lives in ``rag_jax.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("model_io",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rag-jax", description="Retrieval-Augmented Generation in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"rag_jax.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
