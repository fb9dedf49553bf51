"""The ``rag-jax`` command (also ``python -m rag_jax``); each subcommand lives in ``rag_jax.commands``.

Subcommands that take a run config (``train``, ``eval``) also accept ``--config.<field>=<value>``
overrides; any other unknown argument is an error.

Errors: a ``rag_jax.errors.UserError`` (a missing or empty input file, a malformed line in strict
mode, a bad setting, an unreadable checkpoint, a non-finite loss) or an ``OSError`` (a file that
cannot be opened or written) ends the command with one line on stderr, ``rag-jax <command>:
<what> (<where>): <why>``, and exit status 1; a wrong flag with one line and status 2. ``--verbose``
(before or after the subcommand) adds the traceback and the libraries' logs
(``rag_jax.commands.logs``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from rag_jax.commands import host_memory, logs
from rag_jax.errors import UserError

COMMAND_MODULES = ("model_io", "retrieval", "train", "quickstart", "plan")
HUGE_PAGE_COMMANDS = ("quickstart", "train", "eval", "embed")  # subcommands whose work is jitted steps
VERBOSE_HELP = "show the libraries' logs and tracebacks (or set RAG_JAX_LOG_LEVEL=DEBUG/INFO/...)"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the usage itself is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rag-jax", description="Retrieval-Augmented Generation in JAX/Flax.")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"rag_jax.commands.{name}").register(sub)
    for command in sub.choices.values():  # also accepted after the subcommand
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def _subcommand(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """The ``rag-jax`` command. Run as a program (``argv`` None), the subcommands that run jitted work
    (``HUGE_PAGE_COMMANDS``) first re-execute themselves with huge pages for XLA:CPU's buffers
    (``rag_jax.commands.host_memory``); the others skip the second start-up (a second ~1.5 s of imports)."""
    if argv is None and _subcommand(sys.argv[1:]) in HUGE_PAGE_COMMANDS:
        host_memory.reexec_with_huge_pages()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    overrides = [a for a in unknown if a.startswith("--config.")]
    rest = [a for a in unknown if not a.startswith("--config.")]
    if rest or (overrides and not getattr(args, "overrides_allowed", False)):
        parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
    args.overrides = overrides
    try:
        level = logs.verbose_level(args.verbose)
    except ValueError as e:
        parser.error(str(e))
    logs.configure(level)
    return run(args, verbose=level is not None)


def run(args: argparse.Namespace, *, verbose: bool) -> int:
    """The subcommand's handler; an expected failure becomes one line on stderr (module docstring)."""
    try:
        return args.handler(args)
    except UserError as e:
        return _fail(args.command, str(e), verbose)
    except OSError as e:
        return _fail(args.command, f"file ({e.filename}): {e.strerror}" if e.filename else str(e), verbose)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", verbose, status=130)


def _fail(command: str, message: str, verbose: bool, status: int = 1) -> int:
    if verbose:
        traceback.print_exc()
    print(f"rag-jax {command}: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
