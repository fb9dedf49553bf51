"""Errors a user can fix (a missing file, a bad line, a wrong setting), as opposed to bugs.

A ``UserError`` reads ``<what> (<where>): <why>``: what the problem is about (a setting such as
``config.data.train`` or ``--passages``, or a kind of problem), where (a file, ``file:line``, a
folder; optional) and why. ``rag-jax`` prints it as one line after the subcommand's name and exits
with status 1, without a traceback unless ``--verbose``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(Exception):
    """A failure the user can act on. Subclasses name the kind of problem in ``what``."""

    what = "error"

    def __init__(self, why: str, *, where: str | None = None, what: str | None = None):
        super().__init__(why)
        self.why, self.where = why, where
        if what is not None:
            self.what = what

    def __str__(self) -> str:
        return f"{self.what} ({self.where}): {self.why}" if self.where else f"{self.what}: {self.why}"


class ConfigError(UserError, ValueError):
    """A setting (config field, override or flag) that cannot work."""

    what = "config"


class InputFileError(UserError, ValueError):
    """An input file or folder that cannot be used: missing, a directory, unreadable, empty, of an
    unknown format, or holding nothing usable."""

    what = "input file"


@contextlib.contextmanager
def named_by(setting: str) -> Iterator[None]:
    """Input-file errors raised inside are about ``setting`` (the flag or config field that named the
    file): it becomes their ``what``."""
    try:
        yield
    except InputFileError as e:
        e.what = setting
        raise
