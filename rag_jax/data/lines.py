"""Line-oriented input files: decoding, TSV fields, and the bad-line reporter every reader shares.

A reader that finds a line it cannot use raises ``BadLine(reason)`` while parsing it and hands the
reason to a ``LineReporter``, which logs ``path:line: reason`` (the first ``MAX_REPORTED`` at WARNING,
the rest at DEBUG, on the reader's logger), counts it, and ends with one summary line; in strict
mode the first bad line raises ``MalformedLineError`` with that message instead.
"""

from __future__ import annotations

import csv
import logging

MAX_REPORTED = 100  # bad lines logged at WARNING; the rest at DEBUG


class MalformedLineError(ValueError):
    """A line that cannot be read (raised in strict mode, and for problems no reader can skip)."""


class BadLine(Exception):
    """The reason a line is rejected (caught by the reader and given to its ``LineReporter``)."""


def decode_line(raw: bytes) -> str:
    """One line as text, without its line ending; ``BadLine`` when it is not UTF-8."""
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise BadLine(f"not UTF-8 ({e})") from None


def tsv_fields(line: str) -> list[str]:
    """The tab-separated fields of ``line`` (csv quoting, as DPR's files use it, when quoted)."""
    if '"' not in line:
        return line.split("\t")
    try:
        return next(csv.reader([line], delimiter="\t", strict=True))
    except csv.Error as e:
        raise BadLine(f"bad quoting ({e})") from None


class LineReporter:
    """Counts bad lines of ``path`` and reports each with its location on ``logger``."""

    def __init__(self, path: str, strict: bool, logger: logging.Logger):
        self.path, self.strict, self.logger, self.count, self.first = path, strict, logger, 0, None

    def __call__(self, lineno: int, reason: str) -> None:
        where = f"{self.path}:{lineno}: {reason}"
        if self.strict:
            raise MalformedLineError(where)
        self.count += 1
        self.first = self.first or where
        level = logging.WARNING if self.count <= MAX_REPORTED else logging.DEBUG
        self.logger.log(level, "skipped malformed line %s", where)

    def summary(self) -> None:
        if self.count:
            self.logger.warning("%s: skipped %d malformed line(s); the first: %s", self.path, self.count, self.first)
