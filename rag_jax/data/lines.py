"""Line-oriented input files: opening, line numbering, decoding, TSV fields, and the bad-line
reporter every reader shares.

Files are UTF-8, with or without a byte order mark, with ``\\n`` or ``\\r\\n`` line ends. Opening a
missing, directory or unreadable path, or failing to read it (an I/O error, a damaged gzip stream),
raises ``InputFileError`` naming it.

A reader that finds a line it cannot use raises ``BadLine(reason)`` while parsing it and hands the
reason to a ``LineReporter``, which logs ``skipped path:line: reason`` (the first ``MAX_REPORTED``
at WARNING, the rest at DEBUG, on the reader's logger), counts it, and ends with one summary line;
in strict mode the first bad line raises ``MalformedLineError`` (``malformed line (path:line):
reason``) instead.
"""

from __future__ import annotations

import csv
import json
import logging
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

from rag_jax.errors import InputFileError

MAX_REPORTED = 100  # bad lines logged at WARNING; the rest at DEBUG
BOM = b"\xef\xbb\xbf"
READ_FAILURES = (OSError, EOFError, zlib.error)  # what reading a damaged file or gzip stream raises
_OPEN_FAILURES = ((FileNotFoundError, "no such file"), (IsADirectoryError, "a directory, not a file"),
                  (PermissionError, "not readable (permission denied)"))  # fmt: skip


class MalformedLineError(InputFileError):
    """A line that cannot be read (raised in strict mode, and for problems no reader can skip)."""

    what = "malformed line"


class BadLine(Exception):
    """The reason a line is rejected (caught by the reader and given to its ``LineReporter``)."""


def open_input(path: str, opener: Callable[..., BinaryIO] = open) -> BinaryIO:
    """``opener(path, "rb")``; ``InputFileError`` naming ``path`` when it is missing, a directory or
    unreadable."""
    try:
        return opener(path, "rb")
    except OSError as e:
        why = next((reason for kind, reason in _OPEN_FAILURES if isinstance(e, kind)), e.strerror or str(e))
        raise InputFileError(why, where=path) from e


def unreadable(path: str, error: Exception) -> InputFileError:
    """The error for a file whose reading failed with ``error`` (one of ``READ_FAILURES``)."""
    return InputFileError(f"cannot read it ({type(error).__name__}: {error})", where=path)


def numbered_lines(f: BinaryIO, path: str) -> Iterator[tuple[int, int, bytes]]:
    """``(line number from 1, byte offset, raw line)`` for every line of ``f`` (opened from ``path``);
    a byte order mark at the start of the file is not part of the first line."""
    offset = 0
    try:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(BOM):
                raw, start = raw[len(BOM) :], start + len(BOM)
            yield lineno, start, raw
    except READ_FAILURES as e:
        raise unreadable(path, e) from e


def decode_line(raw: bytes) -> str:
    """One line as text, without its line ending; ``BadLine`` when it is not UTF-8."""
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise BadLine(f"not UTF-8 ({e})") from None


def json_line(line: str):
    """The JSON value of one line; ``BadLine`` ("bad JSON (...)") when it is not JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine(f"bad JSON ({e})") from None
    except RecursionError:
        raise BadLine("bad JSON (nested too deeply)") from None


def tsv_fields(line: str) -> list[str]:
    """The tab-separated fields of ``line`` (csv quoting, as DPR's files use it, when quoted)."""
    if '"' not in line:
        return line.split("\t")
    try:
        return next(csv.reader([line], delimiter="\t", strict=True))
    except csv.Error as e:
        raise BadLine(f"bad quoting ({e})") from None


class LineReporter:
    """Counts the bad lines of ``path`` and reports each with its location on ``logger``; ``first``
    is ``(line, reason)`` of the first one."""

    def __init__(self, path: str, strict: bool, logger: logging.Logger):
        self.path, self.strict, self.logger = path, strict, logger
        self.count, self.first = 0, None

    def __call__(self, lineno: int, reason: str) -> None:
        if self.strict:
            raise MalformedLineError(reason, where=f"{self.path}:{lineno}")
        self.count += 1
        self.first = self.first or (lineno, reason)
        level = logging.WARNING if self.count <= MAX_REPORTED else logging.DEBUG
        self.logger.log(level, "skipped %s:%d: %s", self.path, lineno, reason)

    def summary(self, what: str = "malformed line(s)") -> None:
        if self.count:
            line, reason = self.first
            self.logger.warning("%s: skipped %d %s; the first: line %d: %s", self.path, self.count, what, line, reason)
