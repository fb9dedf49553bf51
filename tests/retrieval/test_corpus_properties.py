"""Property tests of the corpus reader and the passage splitter: any bytes on any line never crash
the reader (only a ``UserError`` may end it), every non-blank line is a passage or is reported
(malformed, or a repeated id), so the counts add up; splitting keeps every word, in order."""

import json
import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from rag_jax.data.lines import BOM, BadLine, MalformedLineError, tsv_fields
from rag_jax.errors import InputFileError
from rag_jax.retrieval.corpus import PassageStore, read_passages, split_into_passages

SETTINGS = settings(max_examples=150, deadline=None)


def no_newline(raw: bytes) -> bytes:
    return raw.replace(b"\n", b"")


IDS = st.one_of(st.integers(0, 5), st.sampled_from(["a", "b", "07"]))  # few values: ids repeat
TEXTS = st.one_of(st.text(max_size=10), st.none())
RECORDS = {
    "tsv": st.builds(lambda i, x, t: f"{i}\t{x}\t{t}".encode(), IDS, st.text(max_size=10), st.text(max_size=5)),
    "jsonl": st.builds(lambda i, x, t: json.dumps({"id": i, "text": x, "title": t}).encode(), IDS, TEXTS, st.text()),
}


@st.composite
def corpus_files(draw):
    fmt = draw(st.sampled_from(["tsv", "jsonl"]))
    line = st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode), RECORDS[fmt], st.just(b""),
                     st.just(b"id\ttext\ttitle"))  # fmt: skip
    raw_lines = [no_newline(raw) for raw in draw(st.lists(line, max_size=12))]
    return fmt, raw_lines, draw(st.booleans()), draw(st.sampled_from([b"\n", b"\r\n"]))


def header_lines(fmt: str, seen: list[bytes]) -> int:
    """1 when the TSV reader takes a line for the header: the first non-blank line that is UTF-8."""
    for raw in seen:
        if not raw.strip():
            continue
        try:
            fields = tsv_fields(raw.decode("utf-8").rstrip("\r\n"))
        except (UnicodeDecodeError, BadLine):
            continue
        return int(fmt == "tsv" and {"id", "text", "title"} <= set(fields))
    return 0


@SETTINGS
@given(corpus_files(), st.booleans())
def test_every_non_blank_line_is_a_passage_or_reported(file, strict):
    fmt, raw_lines, bom, ending = file
    seen = [((BOM if bom else b"") + raw).removeprefix(BOM) if i == 0 else raw for i, raw in enumerate(raw_lines)]
    records = sum(1 for raw in seen if raw.strip()) - header_lines(fmt, seen)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, f"corpus.{fmt}")
        with open(path, "wb") as f:
            f.write((BOM if bom else b"") + b"".join(raw + ending for raw in raw_lines))
        try:
            with PassageStore.open(path, strict=strict, cache_dir=os.path.join(directory, "idx")) as store:
                passages = [store[i] for i in range(len(store))]
                meta = store.meta
            streamed = list(read_passages(path))
        except MalformedLineError as e:
            assert strict or "TSV header" in str(e)
            return
        except InputFileError as e:
            assert str(e).endswith("the file is empty (no passages)") if records <= 0 else (
                f"no usable passage: all {records} line(s) malformed" in str(e))  # fmt: skip
            return
    assert len(passages) + meta["num_malformed"] + meta["num_duplicates"] == records
    assert streamed == passages and len({p.id for p in passages}) == len(passages)
    assert all(p.text.strip() for p in passages)
    assert not strict or meta["num_malformed"] + meta["num_duplicates"] == 0


@SETTINGS
@given(st.text(max_size=300), st.text(max_size=20), st.integers(1, 12))
def test_splitting_keeps_every_word_in_order(text, title, words):
    parts = split_into_passages(title, text, words)
    assert [w for p in parts for w in p.text.split()] == text.split()
    assert [len(p.text.split()) for p in parts[:-1]] == [words] * (len(parts) - 1)
    assert all(1 <= len(p.text.split()) <= words for p in parts)
    assert all(p.title == title and p.id == "" and p.text == " ".join(p.text.split()) for p in parts)
