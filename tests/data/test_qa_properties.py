"""Property tests of the QA readers: any bytes on any line never crash a reader (only a ``UserError``
may end a read), and every non-blank line is either read or reported, so the counts add up."""

import json
import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from rag_jax.data.lines import BOM
from rag_jax.data.qa import read_qa
from rag_jax.errors import InputFileError, UserError

SETTINGS = settings(max_examples=150, deadline=None)
LINE_FORMATS = ("tsv", "jsonl", "generation", "fever")
HEADERS = (("question", "answers"), ("question", "answer"))  # what the TSV reader takes for a header
FIELDS = {"jsonl": ("question", "answers"), "generation": ("input", "target"), "fever": ("claim", "label")}


def no_newline(raw: bytes) -> bytes:
    return raw.replace(b"\n", b"")


def records(fmt: str) -> st.SearchStrategy[bytes]:
    """Lines that may well be records of ``fmt`` (so the readers' success paths are exercised too)."""
    answers = st.one_of(st.text(max_size=8), st.lists(st.text(max_size=8), max_size=3), st.integers())
    if fmt == "tsv":
        return st.builds(lambda q, a: f"{q}\t{json.dumps(a)}".encode(), st.text(max_size=12), answers).map(no_newline)
    question_field, answers_field = FIELDS[fmt]
    objects = st.fixed_dictionaries({question_field: st.one_of(st.text(max_size=12), st.none())},
                                    optional={answers_field: answers})  # fmt: skip
    return objects.map(lambda obj: json.dumps(obj).encode())


def lines(fmt: str) -> st.SearchStrategy[list[bytes]]:
    line = st.one_of(st.binary(max_size=40).map(no_newline), st.text(max_size=40).map(str.encode).map(no_newline),
                     records(fmt), st.just(b""), st.just(b"question\tanswers"))  # fmt: skip
    return st.lists(line, max_size=12)


def write(directory: str, name: str, lines: list[bytes], bom: bool, ending: bytes) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write((BOM if bom else b"") + b"".join(raw + ending for raw in lines))
    return path


def as_read(lines: list[bytes], bom: bool) -> list[bytes]:
    """The lines as a reader sees them: one byte order mark at the start of the file is dropped."""
    return [((BOM if bom else b"") + raw).removeprefix(BOM) if i == 0 else raw for i, raw in enumerate(lines)]


def is_header(fmt: str, raw: bytes) -> bool:
    try:
        fields = raw.decode("utf-8").rstrip("\r\n").split("\t")
    except UnicodeDecodeError:
        return False
    return fmt == "tsv" and tuple(x.strip().lower() for x in fields) in HEADERS


@st.composite
def qa_files(draw, formats=LINE_FORMATS):
    fmt = draw(st.sampled_from(formats))
    return fmt, draw(lines(fmt)), draw(st.booleans()), draw(st.sampled_from([b"\n", b"\r\n"]))


@SETTINGS
@given(qa_files(), st.one_of(st.none(), st.integers(1, 6)))
def test_every_non_blank_line_is_read_or_reported(file, max_target_length):
    fmt, raw_lines, bom, ending = file
    seen = as_read(raw_lines, bom)
    records = [i for i, raw in enumerate(seen, start=1) if raw.strip()]
    if seen and seen[0].strip() and is_header(fmt, seen[0]):
        records.remove(1)
    with tempfile.TemporaryDirectory() as directory:
        path = write(directory, "qa.data", raw_lines, bom, ending)
        try:
            examples, report = read_qa(path, format=fmt, target_length=len, max_target_length=max_target_length)
        except InputFileError as e:
            assert str(e).endswith("the file is empty (no examples)") if not records else (
                f"no usable example: all {len(records)} skipped" in str(e))  # fmt: skip
            return
    assert report.num_examples + report.num_skipped == len(records) == len(examples) + report.num_skipped
    read_lines = [int(e.where.rpartition(":")[2]) for e in examples]
    assert read_lines == sorted(set(read_lines)) and set(read_lines) <= set(records)
    assert all(e.question.strip() and e.answers and all(a.strip() for a in e.answers) for e in examples)


@SETTINGS
@given(qa_files(), st.booleans())
def test_strict_reading_stops_only_with_a_user_error(file, strict):
    fmt, raw_lines, bom, ending = file
    with tempfile.TemporaryDirectory() as directory:
        path = write(directory, "qa.jsonl" if fmt != "tsv" else "qa.tsv", raw_lines, bom, ending)
        try:
            _, report = read_qa(path, strict=strict)  # a .jsonl file's kind is sniffed from its first object
        except UserError:
            return
    assert report.num_skipped == 0 or not strict


@SETTINGS
@given(lines("jsonl"), st.booleans(), st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_a_json_array_file_of_any_bytes_never_crashes(raw_lines, bom, ending, bracketed):
    if bracketed:
        raw_lines = [b"[", *(raw + b"," for raw in raw_lines), b"]"]
    with tempfile.TemporaryDirectory() as directory:
        path = write(directory, "qa.json", raw_lines, bom, ending)
        try:
            examples, report = read_qa(path)
        except UserError:
            return
    assert report.num_examples == len(examples) > 0
    assert all(1 <= int(e.where.rpartition(":")[2]) <= len(raw_lines) for e in examples)
