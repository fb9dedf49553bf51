"""QA datasets: (question, answers) examples read from the formats they are distributed in, and a
deterministic, checkpointable, per-process batch iterator over them.

Formats (``format=``, or chosen from the file name; a trailing ``.gz`` is read through gzip):

* ``"json"`` (``.json``): DPR's ``nq-train.json`` style, one JSON array of objects with
  ``"question"`` and ``"answers"``; other fields (``positive_ctxs``, ``ctxs``, ...) are ignored. The
  array is parsed element by element, so a multi-GB file is never held in memory whole.
* ``"tsv"`` (``.tsv``, ``.csv``, ``.txt``): ``question<TAB>answers`` with the answers a list literal,
  as DPR and the RAG repository distribute NQ-open, TriviaQA, WebQuestions and CuratedTrec (their
  ``.qa.csv`` files are tab-separated too). Lines are split with the ``csv`` module (quoted fields,
  doubled inner quotes), as DPR reads them; the answers column is parsed with ``json.loads`` and,
  failing that, ``ast.literal_eval`` (Python literals such as ``['a', "b's"]``; never ``eval``).
  A first line ``question<TAB>answers`` is taken as a header.
* ``"jsonl"``: one ``{"question", "answers"}`` object per line.
* ``"generation"``: one ``{"input", "target"}`` object per line (MS-MARCO / Jeopardy style
  generation): question = input, answers = (target,).
* ``"fever"``: one ``{"claim", "label"}`` object per line: question = claim, answers = (label,)
  (``SUPPORTS`` / ``REFUTES`` / ``NOT ENOUGH INFO``, kept as written).

A ``.jsonl`` file without ``format=`` is ``jsonl``, ``generation`` or ``fever`` by the keys of its
first JSON object (``question`` / ``input`` / ``claim``). In the JSON formats an answers field may
be a list of strings or one string.

Files are UTF-8, with or without a byte order mark, with ``\n`` or ``\r\n`` line ends. A missing,
unreadable or empty file (no record: only blank lines, a header or ``[]``), and a file where no
record is usable, raise ``InputFileError`` naming it.

Bad input is never dropped silently and never stops a long run late. A bad line is skipped,
logged as ``skipped path:line: reason (detail)`` (``rag_jax.data.lines``: the first 100 at WARNING,
the rest at DEBUG), counted by reason in the returned ``ReadReport``, and summarised in one WARNING
at the end (logger ``rag_jax.data.qa``). The reasons: ``not UTF-8``, ``bad JSON``, ``bad quoting``,
``wrong column count``, ``not an object``, ``missing question`` (absent or not a string), ``empty
question``, ``missing answers`` (no field, or an empty TSV answers column), ``bad answers`` (not a
list of non-empty strings, or no list literal), ``no answers`` (an empty list), ``answer too
long``. With ``strict=True`` the first problem raises ``MalformedLineError`` (``malformed line
(path:line): ...``) instead. Blank lines are not records and are skipped without a report.

Answer length: when ``target_length`` (a function, e.g. the number of generator tokens, or ``len``
for characters) and ``max_target_length`` are both given, answers longer than the limit are removed
from their example (each one logged with its line, counted in ``ReadReport.answers_dropped``); an
example left with no answer is skipped under ``answer too long``. Leave them unset for evaluation
files, so the gold answer sets stay whole.

In the ``json`` format an element's line is the line where it starts. A break in the JSON syntax
(not a bad field value, which skips its element as above) leaves no way to find the next element,
so it raises ``MalformedLineError`` even when ``strict=False``; it is found while loading, before
any training starts. Its line is the start of the element that cannot be decoded (the line where
the decoder stopped is in the message: a missing ``}`` is only noticed at the next key), or the
line of the stray text between elements.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import gzip
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from rag_jax.data.lines import (
    MAX_REPORTED,
    READ_FAILURES,
    BadLine,
    LineReporter,
    MalformedLineError,
    decode_line,
    numbered_lines,
    open_input,
    tsv_fields,
    unreadable,
)
from rag_jax.errors import ConfigError, InputFileError

logger = logging.getLogger(__name__)

FORMATS = ("json", "tsv", "jsonl", "generation", "fever")

# (question field, answers field) of the JSON formats.
_FIELDS = {"json": ("question", "answers"), "jsonl": ("question", "answers"), "generation": ("input", "target"),
           "fever": ("claim", "label")}  # fmt: skip

_READ_CHARS = 1 << 20  # characters read at a time from a JSON array
_MAX_ELEMENT_CHARS = 1 << 26  # a JSON array element larger than this is reported as malformed
_SNIFF_LINES = 1000  # lines of a .jsonl file looked at to tell its format
_NOT_JSON_WHITESPACE = re.compile(r"[^ \t\n\r]")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of non-UTF-8 bytes
_EMPTY = "the file is empty (no examples)"


@dataclasses.dataclass(frozen=True)
class QAExample:
    """One example: the question (or claim, or generation input), its gold answers (or label, or
    target) in file order, and where it was read (``"path:line"``)."""

    question: str
    answers: tuple[str, ...]
    where: str


@dataclasses.dataclass
class ReadReport:
    """What reading one file found. ``skipped`` counts the skipped lines by reason;
    ``answers_dropped`` the over-long answers removed from examples that were kept."""

    path: str
    format: str
    num_examples: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    answers_dropped: int = 0
    first_problem: str | None = None

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


class ReadResult(NamedTuple):
    examples: list[QAExample]
    report: ReadReport


class _Bad(Exception):
    """Internal: why a record is rejected (``reason`` is one of the module docstring's reasons)."""

    def __init__(self, reason: str, detail: str = "", *, message: str | None = None):
        super().__init__(message or (f"{reason} ({detail})" if detail else reason))
        self.reason = reason


class _Problems(LineReporter):
    """The corpus reader's policy for bad lines (log / count / strict raises), plus counts by reason
    and the reporting of answers removed for their length."""

    def __init__(self, path: str, strict: bool):
        super().__init__(path, strict, logger)
        self.skipped: collections.Counter[str] = collections.Counter()
        self.answers_dropped = 0
        self.first_problem: str | None = None

    def skip(self, lineno: int, bad: _Bad) -> None:
        self.first_problem = self.first_problem or f"{self.path}:{lineno}: {bad}"
        self(lineno, str(bad))
        self.skipped[bad.reason] += 1

    def drop_answer(self, lineno: int, detail: str) -> None:
        if self.strict:
            raise MalformedLineError(f"answer too long: {detail}", where=f"{self.path}:{lineno}")
        where = f"{self.path}:{lineno}: answer too long: {detail}"
        self.first_problem = self.first_problem or where
        self.answers_dropped += 1
        level = logging.WARNING if self.answers_dropped <= MAX_REPORTED else logging.DEBUG
        logger.log(level, "dropped an answer at %s", where)


# ---------------------------------------------------------------------------------------------
# Fields -> examples


def _answers_tuple(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise _Bad("bad answers", f'"{field}" must be a list of strings, got {value!r:.80}')
    if not value:
        raise _Bad("no answers", f'"{field}" is an empty list')
    if not all(a.strip() for a in value):
        raise _Bad("bad answers", f'"{field}" holds an empty answer: {value!r:.80}')
    return tuple(value)


def _from_object(obj: Any, question_field: str, answers_field: str) -> tuple[str, tuple[str, ...]]:
    if not isinstance(obj, dict):
        raise _Bad("not an object", f"expected a JSON object, got {type(obj).__name__}")
    if question_field not in obj:
        raise _Bad("missing question", f'no "{question_field}" field')
    if not isinstance(obj[question_field], str):
        raise _Bad("missing question", f'"{question_field}" is a {type(obj[question_field]).__name__}, not a string')
    question = obj[question_field]
    if not question.strip():
        raise _Bad("empty question")
    if answers_field not in obj:
        raise _Bad("missing answers", f'no "{answers_field}" field')
    return question, _answers_tuple(obj[answers_field], answers_field)


def _answers_literal(text: str) -> Any:
    """The answers column: JSON, else a Python literal (``ast.literal_eval``, which evaluates no code)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise _Bad("bad answers", f"the answers column is not a list literal: {text!r:.80}") from None


def _tsv_record(line: str) -> tuple[str, tuple[str, ...]]:
    try:
        fields = tsv_fields(line)
    except BadLine as e:
        raise _Bad("bad quoting", message=str(e)) from None
    if len(fields) != 2:
        raise _Bad("wrong column count", f"expected 2 tab-separated columns (question, answers), found {len(fields)}")
    question, answers = fields
    if not question.strip():
        raise _Bad("empty question")
    if not answers.strip():
        raise _Bad("missing answers", "the answers column is empty")
    return question, _answers_tuple(_answers_literal(answers), "answers")


def _jsonl_record(line: str, fields: tuple[str, str]) -> tuple[str, tuple[str, ...]]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Bad("bad JSON", str(e)) from None
    except RecursionError:
        raise _Bad("bad JSON", "nested too deeply") from None
    return _from_object(obj, *fields)


def _json_record(obj: Any) -> tuple[str, tuple[str, ...]]:
    question, answers = _from_object(obj, *_FIELDS["json"])
    if _UNDECODABLE.search(question) or any(_UNDECODABLE.search(a) for a in answers):
        raise _Bad("not UTF-8", "the question or an answer holds bytes that are not UTF-8")
    return question, answers


# ---------------------------------------------------------------------------------------------
# Files -> (line, record or problem)


def _open_binary(path: str):
    return open_input(path, gzip.open if path.endswith(".gz") else open)


def _line_records(path: str, parse: Callable[[str], tuple[str, tuple[str, ...]]], header: tuple[str, ...] = ()
                  ) -> Iterator[tuple[int, tuple[str, tuple[str, ...]] | _Bad]]:  # fmt: skip
    """``(line number, (question, answers) or _Bad)`` for every non-blank line; a first line whose
    lower-cased tab-separated fields are ``header`` is skipped."""
    with _open_binary(path) as f:
        for lineno, _, raw in numbered_lines(f, path):
            if not raw.strip():
                continue
            try:
                line = decode_line(raw)
            except BadLine as e:
                yield lineno, _Bad("not UTF-8", message=str(e))
                continue
            if lineno == 1 and header and tuple(x.strip().lower() for x in line.split("\t")) in header:
                continue
            try:
                yield lineno, parse(line)
            except _Bad as bad:
                yield lineno, bad


class _JsonArrayReader:
    """The elements of the top-level JSON array of a text file, one at a time, with their lines.

    The text is read in pieces of ``_READ_CHARS``; an element is decoded with ``raw_decode`` once
    the buffer holds all of it (an incomplete element fails to decode, and more is read)."""

    def __init__(self, f: io.TextIOBase, path: str):
        self.f, self.path = f, path
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False
        self.decoder = json.JSONDecoder()

    def _fill(self) -> bool:
        """Drop the consumed text and read more (at least as much as is pending, so an element
        larger than a piece costs O(size) reads in total); False at the end of the file."""
        if self.eof:
            return False
        self.buf, self.pos = self.buf[self.pos :], 0
        try:
            chunk = self.f.read(max(_READ_CHARS, len(self.buf)))
        except READ_FAILURES as e:
            raise unreadable(self.path, e) from e
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _peek(self) -> str:
        """Skip whitespace (counting lines); the next character, "" at the end of the file."""
        while True:
            m = _NOT_JSON_WHITESPACE.search(self.buf, self.pos)
            end = m.start() if m else len(self.buf)
            self.line += self.buf.count("\n", self.pos, end)
            self.pos = end
            if m:
                return self.buf[end]
            if not self._fill():
                return ""

    def _fail(self, what: str):
        raise MalformedLineError(what, where=f"{self.path}:{self.line}")

    def _element(self) -> Any:
        """The element that starts at ``self.pos`` (line ``self.line``). A decoding error is
        reported at that start line, the line an element is known by, with the line where the
        decoder stopped in the detail (a missing ``}`` is noticed lines later, at the next key)."""
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except RecursionError:
                self._fail("the element that starts at this line is nested too deeply")
            except json.JSONDecodeError as e:
                stop = self.line + self.buf.count("\n", self.pos, e.pos)  # before _fill moves buf
                error = f"bad JSON in the element that starts at this line ({e.msg} at line {stop})"
                if len(self.buf) - self.pos > _MAX_ELEMENT_CHARS:
                    self._fail(f"{error} or an element over {_MAX_ELEMENT_CHARS} characters")
                if not self._fill():
                    self._fail(f"{error}; the array cannot be read past this point")
                continue
            if end == len(self.buf) and self._fill():  # a number or literal may go on in the next piece
                continue
            self.line += self.buf.count("\n", self.pos, end)
            self.pos = end
            return obj

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        if self._peek() == "":  # an empty file: no elements
            return
        if self._peek() != "[":
            self._fail("expected a JSON array ('['); for one JSON object per line use format='jsonl'")
        self.pos += 1
        if self._peek() == "]":
            self.pos += 1
        else:
            while True:
                if self._peek() == "":
                    self._fail("the file ends inside the JSON array")
                start = self.line
                yield start, self._element()
                following = self._peek()
                self.pos += 1
                if following == "]":
                    break
                if following == "":
                    self._fail("the file ends inside the JSON array (no ']')")
                if following != ",":
                    self._fail(f"expected ',' or ']' after the element that starts at line {start}")
        if self._peek() != "":
            self._fail("text after the end of the JSON array")


def _json_records(path: str) -> Iterator[tuple[int, tuple[str, tuple[str, ...]] | _Bad]]:
    raw = _open_binary(path)
    with io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape") as f:
        for lineno, obj in _JsonArrayReader(f, path):
            try:
                yield lineno, _json_record(obj)
            except _Bad as bad:
                yield lineno, bad


def _sniff_jsonl(path: str) -> str:
    """``jsonl`` / ``generation`` / ``fever`` by the keys of the first JSON object in the file."""
    blank = True
    with _open_binary(path) as f:
        for lineno, _, raw in numbered_lines(f, path):
            if lineno > _SNIFF_LINES:
                break
            blank = blank and not raw.strip()
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                continue
            if isinstance(obj, dict):
                for fmt in ("jsonl", "generation", "fever"):
                    if _FIELDS[fmt][0] in obj:
                        return fmt
                raise InputFileError(f"a JSON object with none of the keys question / input / claim; pass format= "
                                     f"one of {FORMATS}", where=f"{path}:{lineno}")  # fmt: skip
    if blank:
        raise InputFileError(_EMPTY, where=path)
    raise InputFileError(f"no JSON object in the first {_SNIFF_LINES} lines; pass format= one of {FORMATS}",
                         where=path)  # fmt: skip


def detect_format(path: str, format: str | None = None) -> str:
    """The format of ``path``: ``format`` when given (checked), else from the name (and, for
    ``.jsonl``, the first record's keys)."""
    if format is not None:
        if format not in FORMATS:
            raise ConfigError(f"format must be one of {FORMATS}, got {format!r}")
        return format
    name = path.removesuffix(".gz")
    if name.endswith(".json"):
        return "json"
    if name.endswith((".tsv", ".csv", ".txt")):
        return "tsv"
    if name.endswith(".jsonl"):
        return _sniff_jsonl(path)
    raise InputFileError(f"cannot tell the format from the name; pass format= one of {FORMATS}", where=path)


def _records(path: str, fmt: str) -> Iterator[tuple[int, tuple[str, tuple[str, ...]] | _Bad]]:
    if fmt == "json":
        return _json_records(path)
    if fmt == "tsv":
        return _line_records(path, _tsv_record, header=(("question", "answers"), ("question", "answer")))
    fields = _FIELDS[fmt]
    return _line_records(path, lambda line: _jsonl_record(line, fields))


def read_qa(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    strict: bool = False,
    target_length: Callable[[str], int] | None = None,
    max_target_length: int | None = None,
    progress: bool = False,
) -> ReadResult:
    """Read the QA examples of one file (formats and the handling of bad input: the module
    docstring). Returns ``(examples, report)``; examples keep the file's order.

    ``target_length`` measures an answer (e.g. ``lambda s: len(tokenizer(s)["input_ids"])`` for the
    generator's label tokens, or ``len`` for characters); with ``max_target_length`` it removes the
    answers that would be truncated. Either one alone checks nothing."""
    path = os.fspath(path)
    fmt = detect_format(path, format)
    problems = _Problems(path, strict)
    check_length = target_length is not None and max_target_length is not None
    examples = []
    records = tqdm(_records(path, fmt), desc=f"reading {os.path.basename(path)}", unit=" examples",
                   mininterval=2.0, disable=not progress)  # fmt: skip
    for lineno, record in records:
        if isinstance(record, _Bad):
            problems.skip(lineno, record)
            continue
        question, answers = record
        if check_length:
            lengths = [target_length(a) for a in answers]
            if min(lengths) > max_target_length:
                detail = f"length {lengths[0]} > max_target_length={max_target_length}: {answers[0]!r:.80}"
                if len(answers) > 1:
                    detail = f"all {len(answers)} answers are longer than max_target_length={max_target_length}"
                problems.skip(lineno, _Bad("answer too long", detail))
                continue
            for i, (answer, n) in enumerate(zip(answers, lengths)):
                if n > max_target_length:
                    problems.drop_answer(lineno, f"answer {i + 1} of {len(answers)} has length {n} > "
                                         f"max_target_length={max_target_length}: {answer!r:.80}")  # fmt: skip
            answers = tuple(a for a, n in zip(answers, lengths) if n <= max_target_length)
        examples.append(QAExample(question, answers, f"{path}:{lineno}"))
    report = ReadReport(path, fmt, len(examples), dict(problems.skipped), problems.answers_dropped,
                        problems.first_problem)  # fmt: skip
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(report.skipped.items()))
    if report.num_skipped or report.answers_dropped:
        logger.warning("%s: read %d example(s); skipped %d line(s) (%s); dropped %d over-long answer(s); the first "
                       "problem: %s", path, report.num_examples, report.num_skipped, reasons or "none",
                       report.answers_dropped, report.first_problem)  # fmt: skip
    if not examples:
        why = f"no usable example: all {report.num_skipped} skipped ({reasons}); the first problem: "
        raise InputFileError(why + report.first_problem if report.num_skipped else _EMPTY, where=path)
    return ReadResult(examples, report)


# ---------------------------------------------------------------------------------------------
# Batches


class BatchIterator:
    """Endless iterator over this process's share of each global batch of example indices.

    Epoch ``e`` visits the examples in an order that depends only on ``(seed, e)`` (a permutation
    from ``np.random.default_rng([seed, e])``, or ``0..n-1`` with ``shuffle=False``); global batch
    ``b`` of the epoch is ``order[b * batch_size : (b + 1) * batch_size]``, and process ``p`` of
    ``process_count`` gets its contiguous ``batch_size / process_count`` slice. So the global
    batches do not depend on the number of processes: one process with batch G and two processes
    with G/2 each see the same examples at every step.

    ``batch_size`` is the global batch size (a multiple of ``process_count``). With
    ``drop_remainder=True`` (the default, for training) the last ``n % batch_size`` examples of
    each epoch's order are not used in that epoch (they are other examples every epoch); with
    ``False`` the epoch ends with a shorter global batch, split into contiguous slices of
    ``ceil(r / process_count)`` (the last processes may get fewer, even none). ``num_epochs`` ends
    the iteration; None never does.

    ``state()`` is a JSON-able dict (seed, epoch, position = global batches taken in the epoch, and
    the settings that fix the order); ``restore(state)`` continues exactly where it was, also with
    another process count.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
    ):
        if num_examples < 1 or batch_size < 1:
            raise ValueError(f"num_examples and batch_size must be >= 1, got {num_examples} and {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
        if batch_size % process_count:
            raise ValueError(f"the global batch_size {batch_size} is not a multiple of process_count {process_count}")
        if drop_remainder and num_examples < batch_size:
            raise ConfigError(f"{num_examples} example(s) make no full batch of batch_size={batch_size} "
                              "(drop_remainder=True)")  # fmt: skip
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_examples, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.process_index, self.process_count = process_index, process_count
        self.drop_remainder, self.num_epochs = drop_remainder, num_epochs
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, np.int64)

    @property
    def batches_per_epoch(self) -> int:
        n, g = self.num_examples, self.batch_size
        return n // g if self.drop_remainder else math.ceil(n / g)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All example indices in the order of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.num_examples, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples).astype(np.int64)

    def global_batch(self, epoch: int, position: int) -> np.ndarray:
        """The indices of global batch ``position`` of ``epoch`` (every process's share)."""
        if self._order_epoch != epoch:
            self._order_epoch, self._order = epoch, self.epoch_order(epoch)
        return self._order[position * self.batch_size : (position + 1) * self.batch_size]

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> np.ndarray:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        batch = self.global_batch(self.epoch, self.position)
        share = math.ceil(len(batch) / self.process_count)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch[self.process_index * share : (self.process_index + 1) * share]

    def state(self) -> dict:
        """Where the iterator is, as plain JSON types (the next batch is ``position`` of ``epoch``)."""
        return {"epoch": self.epoch, "position": self.position, **self._settings()}

    def restore(self, state: dict) -> None:
        """Continue from ``state`` (from ``state()`` of an iterator with the same settings)."""
        mismatched = {k: (state.get(k), v) for k, v in self._settings().items() if state.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {saved!r}, now {now!r}" for k, (saved, now) in mismatched.items())
            raise ValueError(f"the saved data-iterator state does not match this iterator ({details})")
        if not (0 <= state["position"] < self.batches_per_epoch and state["epoch"] >= 0):
            raise ValueError(f"bad data-iterator position: epoch {state['epoch']}, batch {state['position']}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _settings(self) -> dict:
        return {"seed": self.seed, "num_examples": self.num_examples, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "drop_remainder": self.drop_remainder}  # fmt: skip
