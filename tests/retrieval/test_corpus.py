"""Passage corpus: DPR TSV / JSONL reading, 100-word splitting, malformed lines, random access."""

import json
import logging
import os
import pickle

import numpy as np
import pytest

from rag_jax.data.lines import BOM
from rag_jax.errors import InputFileError
from rag_jax.retrieval.corpus import (
    MalformedLineError,
    Passage,
    PassageStore,
    read_passages,
    split_into_passages,
    write_passages_tsv,
)

# Lines as they appear in DPR's psgs_w100.tsv: the text quoted, inner quotes doubled.
DPR_TSV = (
    "id\ttext\ttitle\n"
    '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet, high priest, and the brother of Moses."\tAaron\n'
    '2\t"God gave Aaron a rod."\tAaron\n'
    '3\tplain unquoted text\t"""Weird Al"" Yankovic"\n'
)


def test_reads_dpr_tsv_with_csv_quoting(tmp_path):
    path = tmp_path / "psgs.tsv"
    path.write_text(DPR_TSV, encoding="utf-8")
    passages = list(read_passages(str(path)))
    assert passages == [
        Passage("1", "Aaron", 'Aaron Aaron ( or ; "Ahärôn") is a prophet, high priest, and the brother of Moses.'),
        Passage("2", "Aaron", "God gave Aaron a rod."),
        Passage("3", '"Weird Al" Yankovic', "plain unquoted text"),
    ]


def test_tsv_header_columns_in_any_order_and_jsonl(tmp_path):
    tsv = tmp_path / "c.tsv"
    tsv.write_text("title\tid\ttext\nT1\t7\tsome text\n", encoding="utf-8")
    assert list(read_passages(str(tsv))) == [Passage("7", "T1", "some text")]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"id": 5, "title": "A", "text": "x y"}\n{"id": "b", "text": "no title"}\n', encoding="utf-8")
    assert list(read_passages(str(jsonl))) == [Passage("5", "A", "x y"), Passage("b", "", "no title")]


def test_split_into_passages():
    text = " ".join(f"w{i}" for i in range(250))
    parts = split_into_passages("T", "  " + text.replace("w7 ", "w7\n\t "), words=100)
    assert [len(p.text.split()) for p in parts] == [100, 100, 50]
    assert all(p.title == "T" for p in parts)
    assert " ".join(p.text for p in parts) == text
    assert split_into_passages("T", "   ") == []


def test_write_then_read_round_trip(tmp_path):
    docs = [("Doc one", " ".join(["alpha"] * 130)), ('Quote "x"', 'He said "hi"\tand\nleft')]
    passages = [p for title, text in docs for p in split_into_passages(title, text)]
    path = str(tmp_path / "out.tsv")
    assert write_passages_tsv(passages, path) == 3
    back = list(read_passages(path))
    assert [p.id for p in back] == ["1", "2", "3"]
    assert [(p.title, p.text) for p in back] == [
        ("Doc one", " ".join(["alpha"] * 100)),
        ("Doc one", " ".join(["alpha"] * 30)),
        ('Quote "x"', 'He said "hi" and left'),
    ]


MALFORMED_TSV = (
    b"id\ttext\ttitle\n"
    b"1\tgood one\tA\n"
    b"2\tonly two columns\n"  # line 3
    b"3\t\xff\xfe not utf-8\tB\n"  # line 4
    b"\n"  # blank: not a record, not reported
    b"4\t \tC\n"  # line 6: empty text
    b'5\t"unterminated\tD\n'  # line 7: bad quoting
    b"6\tgood two\tE\n"
)


def test_malformed_lines_are_skipped_counted_and_reported(tmp_path, caplog):
    path = tmp_path / "bad.tsv"
    path.write_bytes(MALFORMED_TSV)
    with caplog.at_level(logging.WARNING, logger="rag_jax.retrieval.corpus"):
        store = PassageStore.open(str(path))
    assert [p.id for p in read_passages(str(path))] == ["1", "6"]
    assert len(store) == 2 and store[1] == Passage("6", "E", "good two")
    assert store.ids.tolist() == [1, 6]
    assert store.meta["num_malformed"] == 4
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for line in (3, 4, 6, 7):
        assert f"{path}:{line}:" in messages
    assert "skipped 4 malformed line(s)" in messages
    with pytest.raises(MalformedLineError, match=f"\\({path}:3\\): expected 3 tab-separated columns, found 2"):
        list(read_passages(str(path), strict=True))
    with pytest.raises(MalformedLineError, match=f"\\({path}:3\\): expected 3 .* \\(and 3 more skipped line"):
        # strict with the cached sidecar too
        PassageStore.open(str(path), strict=True)


def test_malformed_jsonl(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "text": "ok"}\n{not json}\n{"id": 2}\n{"id": 3, "text": ""}\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="rag_jax.retrieval.corpus"):
        assert [p.id for p in read_passages(str(path))] == ["1"]
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{path}:2: bad JSON" in messages and f"{path}:3:" in messages and f"{path}:4: empty text" in messages
    with pytest.raises(MalformedLineError, match=f"\\({path}:2\\): bad JSON"):
        list(read_passages(str(path), strict=True))


@pytest.mark.parametrize("name, text", [
    ("header.tsv", "id\ttext\ttitle\n1\tfirst text\tA\n2\tsecond\tB\n"),
    ("plain.tsv", "1\tfirst text\tA\n2\tsecond\tB\n"),
    ("lines.jsonl", '{"id": 1, "text": "first text", "title": "A"}\n{"id": 2, "text": "second", "title": "B"}\n'),
])  # fmt: skip
def test_byte_order_mark_and_crlf_line_ends(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(BOM + text.replace("\n", "\r\n").encode())
    expected = [Passage("1", "A", "first text"), Passage("2", "B", "second")]
    assert list(read_passages(str(path))) == expected
    with PassageStore.open(str(path)) as store:
        assert store.ids.tolist() == [1, 2] and [store[0], store[1]] == expected


def test_repeated_ids_keep_the_first_and_are_reported(tmp_path, caplog):
    path = tmp_path / "dup.tsv"
    path.write_text("id\ttext\ttitle\n1\tone\tA\n2\ttwo\tB\n1\tone again\tC\n\n3\tthree\tD\n2\ttwo again\tE\n"
                    "1\tthird one\tF\n")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="rag_jax.retrieval.corpus"):
        store = PassageStore.open(str(path))
    assert [store[i].text for i in range(len(store))] == ["one", "two", "three"]
    assert store.ids.tolist() == [1, 2, 3] and store.row_of(2) == 1
    assert store.meta["num_duplicates"] == 3 and store.meta["num_passages"] == 3
    *per_line, summary = [r.getMessage() for r in caplog.records]
    assert per_line == [f"skipped {path}:4: duplicate id 1 (first at line 2)",
                        f"skipped {path}:7: duplicate id 2 (first at line 3)",
                        f"skipped {path}:8: duplicate id 1 (first at line 2)"]  # fmt: skip
    assert summary == f"{path}: skipped 3 line(s) with a repeated id; the first: line 4: " + per_line[0].split(": ")[-1]
    assert [p.text for p in read_passages(str(path))] == ["one", "two", "three"]
    with pytest.raises(MalformedLineError, match=rf"^malformed line \({path}:4\): duplicate id 1 \(first at line 2\)"):
        list(read_passages(str(path), strict=True))
    with pytest.raises(MalformedLineError, match=r"duplicate id 1 \(first at line 2\) \(and 2 more skipped line"):
        PassageStore.open(str(path), strict=True)  # the cached sidecar
    strings = tmp_path / "dup.jsonl"
    strings.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n')
    assert [p.text for p in read_passages(str(strings))] == ["x", "y"]


@pytest.mark.parametrize("text", ["", "\n\n", "id\ttext\ttitle\n", "\ufeff"])
def test_an_empty_corpus_is_an_error_naming_it(tmp_path, text):
    path = tmp_path / "empty.tsv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputFileError, match=rf"^input file \({path}\): the file is empty \(no passages\)$"):
        PassageStore.open(str(path))


def test_missing_directory_and_unusable_corpora_are_errors_naming_them(tmp_path):
    with pytest.raises(InputFileError, match=rf"^input file \({tmp_path / 'no.tsv'}\): no such file$"):
        PassageStore.open(str(tmp_path / "no.tsv"))
    (tmp_path / "dir.tsv").mkdir()
    with pytest.raises(InputFileError, match=r"dir.tsv\): a directory, not a file$"):
        list(read_passages(str(tmp_path / "dir.tsv")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{"id": 2, "text": ""}\n')
    with pytest.raises(InputFileError, match=r"no usable passage: all 2 line\(s\) malformed; the first: line 1: "):
        PassageStore.open(str(bad))


@pytest.fixture
def corpus_file(tmp_path):
    rng = np.random.default_rng(0)
    passages = [
        Passage("", f"Title {i} \"q\"", " ".join(f"w{j}" for j in rng.integers(0, 1000, size=rng.integers(1, 40))))
        for i in range(57)
    ]
    path = str(tmp_path / "corpus.tsv")
    write_passages_tsv(passages, path, first_id=100)
    return path


def test_random_access_equals_sequential_reading(corpus_file):
    sequential = list(read_passages(corpus_file))
    with PassageStore.open(corpus_file) as store:
        assert len(store) == len(sequential) == 57
        assert [store[i] for i in range(len(store))] == sequential
        assert store[-1] == sequential[-1]
        rows = [56, 3, 3, 0, 17]
        assert store.get_many(np.array(rows)) == [sequential[i] for i in rows]
        assert store.slice(10, 20) == sequential[10:20]
        assert [p for batch in store.iter_batches(8, start=5) for p in batch] == sequential[5:]
        assert store.ids.dtype == np.int64 and store.ids[0] == 100
        assert store.row_of(142) == 42 and store.row_of("142") == 42
        with pytest.raises(KeyError):
            store.row_of(99)
        with pytest.raises(IndexError, match="row 57 out of range for a store of 57"):
            store[57]
        clone = pickle.loads(pickle.dumps(store))
        assert clone[30] == sequential[30]


def test_sidecar_reused_then_rebuilt_when_file_changes(corpus_file):
    PassageStore.open(corpus_file).close()
    offsets = os.path.join(corpus_file + ".idx", "offsets.npy")
    stamp = os.stat(offsets).st_mtime_ns
    PassageStore.open(corpus_file).close()
    assert os.stat(offsets).st_mtime_ns == stamp  # reused
    with open(corpus_file, "a", encoding="utf-8") as f:
        f.write("999\tan added passage\tNew\n")
    with PassageStore.open(corpus_file) as store:
        assert len(store) == 58 and store[57] == Passage("999", "New", "an added passage")


def test_string_ids(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": f"t{i}"}) + "\n" for i in (3, 1, 2)), encoding="utf-8")
    with PassageStore.open(str(path), cache_dir=str(tmp_path / "cache")) as store:
        assert store.ids.tolist() == ["doc-3", "doc-1", "doc-2"]
        assert store.row_of("doc-2") == 2
        with pytest.raises(KeyError):
            store.row_of("doc-9")
