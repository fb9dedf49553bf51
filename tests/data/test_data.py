"""QA data: the file formats, bad input (skipped, reported by file:line, counted; strict raises),
and the deterministic, checkpointable, per-process batch iterator."""

import gzip
import json
import logging

import numpy as np
import pytest

from rag_jax.data import qa as data
from rag_jax.data.lines import BOM, MalformedLineError, open_input
from rag_jax.data.qa import BatchIterator, QAExample, read_qa
from rag_jax.errors import InputFileError

# As DPR's nq-train.json: an indented array of objects with fields we ignore.
DPR_JSON = [
    {"dataset": "nq", "question": "who sings does he love me with reba", "answers": ["Linda Davis"],
     "positive_ctxs": [{"title": "Does He Love You", "text": "a b c", "score": 1000, "passage_id": "11828866"}],
     "negative_ctxs": [], "hard_negative_ctxs": []},
    {"dataset": "nq", "question": "how many pages is invisible man by ralph ellison",
     "answers": ["581 (second edition)", "581"], "positive_ctxs": []},
]  # fmt: skip


def test_dpr_json_array(tmp_path):
    path = tmp_path / "nq-train.json"
    text = json.dumps(DPR_JSON, indent=4)
    path.write_text(text, encoding="utf-8")
    examples, report = read_qa(path)
    assert [(e.question, e.answers) for e in examples] == [
        ("who sings does he love me with reba", ("Linda Davis",)),
        ("how many pages is invisible man by ralph ellison", ("581 (second edition)", "581")),
    ]
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if line == "    {"]  # where elements start
    assert [e.where for e in examples] == [f"{path}:{n}" for n in starts] and starts[0] == 2
    assert report.format == "json" and report.num_examples == 2 and report.num_skipped == 0


@pytest.mark.parametrize("piece", [1, 3, 17])
def test_json_array_read_in_small_pieces_gives_the_same(tmp_path, monkeypatch, piece):
    """The array is streamed: elements spanning many reads decode the same, with the same lines."""
    path = tmp_path / "a.json.gz"
    text = json.dumps(DPR_JSON * 3, indent=2)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    whole = read_qa(path).examples
    monkeypatch.setattr(data, "_READ_CHARS", piece)
    assert read_qa(path).examples == whole and len(whole) == 6
    empty = tmp_path / "empty.json"
    empty.write_text(" [ ]\n")
    with pytest.raises(InputFileError, match=r"empty.json\): the file is empty \(no examples\)"):
        read_qa(empty)


def test_tsv_with_python_and_json_answer_lists(tmp_path):
    path = tmp_path / "nq-test.qa.csv"  # DPR's .qa.csv files are tab-separated
    path.write_text(
        "who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']\n"
        "when is the next deadpool movie being released\t[\"May 18 , 2018\"]\n"
        "\n"
        '"the song ""hey jude"" was written for"\t[\'Julian Lennon\', "Lennon\'s son"]\n',
        encoding="utf-8",
    )
    examples, report = read_qa(path)
    assert examples == [
        QAExample("who got the first nobel prize in physics", ("Wilhelm Conrad Röntgen",), f"{path}:1"),
        QAExample("when is the next deadpool movie being released", ("May 18 , 2018",), f"{path}:2"),
        QAExample('the song "hey jude" was written for', ("Julian Lennon", "Lennon's son"), f"{path}:4"),
    ]
    assert report.format == "tsv"
    header = tmp_path / "h.tsv"
    header.write_text("question\tanswers\nq1\t['a']\n", encoding="utf-8")
    assert read_qa(header).examples == [QAExample("q1", ("a",), f"{header}:2")]


def test_literal_answers_are_never_evaluated(tmp_path):
    path = tmp_path / "evil.tsv"
    path.write_text("q\t__import__('os').getcwd()\nok\t['a']\n", encoding="utf-8")
    examples, report = read_qa(path)
    assert [e.question for e in examples] == ["ok"] and report.skipped == {"bad answers": 1}


def test_jsonl_generation_and_fever(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "q1", "answers": ["a1", "a2"]}\n{"question": "q2", "answers": "one"}\n')
    gen = tmp_path / "msmarco.jsonl"
    gen.write_text('{"input": "what is rag", "target": "retrieval-augmented generation", "id": 3}\n')
    fever = tmp_path / "fever.jsonl"
    fever.write_text('{"id": 1, "claim": "Nikolaj was born in Denmark.", "label": "SUPPORTS", "evidence": []}\n'
                     '{"id": 2, "claim": "Cats are fish.", "label": "REFUTES"}\n')  # fmt: skip
    assert [(e.question, e.answers) for e in read_qa(qa).examples] == [("q1", ("a1", "a2")), ("q2", ("one",))]
    examples, report = read_qa(gen)
    assert report.format == "generation"
    assert examples == [QAExample("what is rag", ("retrieval-augmented generation",), f"{gen}:1")]
    examples, report = read_qa(fever)
    assert report.format == "fever" and [e.answers for e in examples] == [("SUPPORTS",), ("REFUTES",)]
    other = tmp_path / "x.data"
    other.write_text('{"claim": "c", "label": "NOT ENOUGH INFO"}\n')
    assert read_qa(other, format="fever").examples[0].answers == ("NOT ENOUGH INFO",)
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_qa(other)
    with pytest.raises(ValueError, match="format must be one of"):
        read_qa(other, format="csv")


BAD_JSONL = (
    b'{"question": "good one", "answers": ["yes"]}\n'  # 1
    b'{"question": "", "answers": ["x"]}\n'  # 2: empty question
    b'{"question": "no answers field"}\n'  # 3: missing answers
    b'{"question": "caf\xe9", "answers": ["x"]}\n'  # 4: latin-1 byte, not UTF-8
    b'{"question": "broken", "answers": [\n'  # 5: bad JSON
    b'["not", "an", "object"]\n'  # 6
    b'{"question": "empty list", "answers": []}\n'  # 7: no answers
    b'{"question": "numbers", "answers": [1, 2]}\n'  # 8: bad answers
    b'{"answers": ["no question"]}\n'  # 9: missing question
    b'{"question": "good two", "answers": ["a", "b"]}\n'  # 10
)


def test_bad_lines_are_skipped_reported_and_counted(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_JSONL)
    with caplog.at_level(logging.WARNING):
        examples, report = read_qa(path)
    assert [e.question for e in examples] == ["good one", "good two"]
    assert report.skipped == {"empty question": 1, "missing answers": 1, "not UTF-8": 1, "bad JSON": 1,
                              "not an object": 1, "no answers": 1, "bad answers": 1, "missing question": 1}  # fmt: skip
    assert report.num_skipped == 8 and report.num_examples == 2
    messages = [r.getMessage() for r in caplog.records]
    for line, reason in [(2, "empty question"), (3, 'missing answers (no "answers" field)'), (4, "not UTF-8"),
                         (5, "bad JSON"), (6, "not an object"), (7, "no answers"), (8, "bad answers"),
                         (9, 'missing question (no "question" field)')]:  # fmt: skip
        assert any(f"{path}:{line}: {reason}" in m for m in messages), (line, reason)
    summary = messages[-1]
    assert f"{path}: read 2 example(s); skipped 8 line(s)" in summary and "empty question: 1" in summary
    assert report.first_problem.startswith(f"{path}:2: empty question")


def test_strict_raises_at_the_first_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_JSONL)
    with pytest.raises(MalformedLineError, match=f"^malformed line \\({path}:2\\): empty question$"):
        read_qa(path, strict=True)
    tsv = tmp_path / "bad.tsv"
    tsv.write_bytes(b"q1\t['a']\nq2\tnot a list\n")
    with pytest.raises(MalformedLineError, match=f"\\({tsv}:2\\): bad answers \\(the answers column is not a list"):
        read_qa(tsv, strict=True)


def test_bad_tsv_lines(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"ok\t['a']\nthree\t['a']\textra\n\t['a']\nq\t\"unterminated\n\xff\xfe\t['a']\nq\t[]\n")
    examples, report = read_qa(path)
    assert [e.question for e in examples] == ["ok"]
    assert report.skipped == {"wrong column count": 1, "empty question": 1, "bad quoting": 1, "not UTF-8": 1,
                              "no answers": 1}  # fmt: skip


def test_dpr_json_bad_elements_are_skipped_with_their_line(tmp_path, caplog):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"question": "q1", "answers": ["a"]},\n{"question": "q2"},\n'
                     b'{"question": "caf\xe9", "answers": ["a"]},\n7,\n'
                     b'{"question": "q5",\n "answers": ["b"]}\n]\n')  # fmt: skip
    with caplog.at_level(logging.WARNING):
        examples, report = read_qa(path)
    assert [(e.question, e.where) for e in examples] == [("q1", f"{path}:2"), ("q5", f"{path}:6")]
    assert report.skipped == {"missing answers": 1, "not UTF-8": 1, "not an object": 1}
    text = "\n".join(r.getMessage() for r in caplog.records)
    for expected in (f"{path}:3: missing answers", f"{path}:4: not UTF-8", f"{path}:5: not an object"):
        assert expected in text


@pytest.mark.parametrize("piece", [1, 4, 1 << 20])
def test_dpr_json_broken_array_raises_with_its_line(tmp_path, monkeypatch, piece):
    monkeypatch.setattr(data, "_READ_CHARS", piece)
    path = tmp_path / "d.json"
    # the element of line 3 lacks its "}"; the decoder notices at line 5, where a key should follow the ","
    path.write_text('[\n{"question": "q1", "answers": ["a"]},\n{"question": "q2", "answers": ["b"]\n,\n'
                    '{"question": "q3", "answers": ["c"]}]\n')  # fmt: skip
    with pytest.raises(MalformedLineError, match=f"\\({path}:3\\): bad JSON in the element that starts at this line "
                                                 r"\(Expecting property name .* at line 5\)"):  # fmt: skip
        read_qa(path)
    path.write_text('[{"question": "q1", "answers": ["a"]}\n{"question": "q2", "answers": ["b"]}]')
    with pytest.raises(MalformedLineError, match=f"\\({path}:2\\): expected ',' or ']' after the element that starts "
                                                 "at line 1$"):  # fmt: skip
        read_qa(path)
    path.write_text('{"question": "q1", "answers": ["a"]}\n')
    with pytest.raises(MalformedLineError, match="expected a JSON array"):
        read_qa(path)
    path.write_text('[{"question": "q1", "answers": ["a"]},\n{"question": "q2", "answers": ["b"]}\n')
    with pytest.raises(MalformedLineError, match=f"\\({path}:3\\): the file ends inside the JSON array"):
        read_qa(path)
    path.write_text('[{"question": "q1", "answers": ["a"]},\n{"question": "q2", "ans')
    with pytest.raises(MalformedLineError, match=f"\\({path}:2\\): bad JSON in the element that starts at this line"):
        read_qa(path)
    path.write_text('[{"question": "q1", "answers": ["a"]}] x')
    with pytest.raises(MalformedLineError, match=f"\\({path}:1\\): text after the end of the JSON array"):
        read_qa(path)


def test_over_long_answers_are_dropped_and_reported(tmp_path, caplog):
    path = tmp_path / "long.jsonl"
    path.write_text('{"question": "q1", "answers": ["short", "a much longer answer"]}\n'
                    '{"question": "q2", "answers": ["far too long to keep"]}\n'
                    '{"question": "q3", "answers": ["tiny"]}\n')  # fmt: skip

    def words(text):  # a length function: words here, generator tokens in practice
        return len(text.split())

    with caplog.at_level(logging.WARNING):
        examples, report = read_qa(path, target_length=words, max_target_length=2)
    assert [(e.question, e.answers) for e in examples] == [("q1", ("short",)), ("q3", ("tiny",))]
    assert report.skipped == {"answer too long": 1} and report.answers_dropped == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{path}:1: answer too long: answer 2 of 2 has length 4 > max_target_length=2" in text
    assert f"{path}:2: answer too long (length 5 > max_target_length=2" in text
    assert "dropped 1 over-long answer(s)" in text
    # without a length function nothing is checked; strict stops at the first over-long answer
    assert len(read_qa(path, max_target_length=2).examples) == 3
    with pytest.raises(MalformedLineError, match=f"\\({path}:1\\): answer too long: answer 2 of 2"):
        read_qa(path, target_length=words, max_target_length=2, strict=True)
    assert len(read_qa(path, target_length=len, max_target_length=20).examples) == 3  # characters


# The same problems in every format: (question, answers or None for no answers field, encoding).
FIELDS = {"json": ("question", "answers"), "tsv": (None, None), "jsonl": ("question", "answers"),
          "generation": ("input", "target"), "fever": ("claim", "label")}  # fmt: skip
PROBLEM_ROWS = [
    ("", "x", "empty question"),
    ("no answers field", None, "missing answers"),
    ("caf\u00e9", "x", "not UTF-8"),  # written in latin-1
    ("long", "far too long an answer", "answer too long"),  # longer than MAX_CHARS
]
MAX_CHARS = 10


def write_qa_file(tmp_path, fmt, rows):
    """``rows`` of (question, answer or None, reason) as a file of format ``fmt``; the answer is a
    one-element list in json / tsv / jsonl and a plain string in generation / fever. Returns the
    path and the line of the first row."""
    question_field, answers_field = FIELDS[fmt]
    lines = []
    for question, answer, reason in rows:
        answers = None if answer is None else answer if fmt in ("generation", "fever") else [answer]
        if fmt == "tsv":
            text = question + "\t" + ("" if answers is None else json.dumps(answers, ensure_ascii=False))
        else:
            obj = {question_field: question, **({} if answers is None else {answers_field: answers})}
            text = json.dumps(obj, ensure_ascii=False)
        lines.append(text.encode("latin-1" if reason == "not UTF-8" else "utf-8"))
    name = {"json": "qa.json", "tsv": "qa.tsv"}.get(fmt, f"{fmt}.jsonl")  # jsonl kinds told by their keys
    path = tmp_path / name
    if fmt == "json":
        path.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")
        return path, 2
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, 1


@pytest.mark.parametrize("fmt", data.FORMATS)
def test_every_format_reports_each_problem_with_its_line(tmp_path, caplog, fmt):
    rows = [("good one", "yes", None), *PROBLEM_ROWS, ("good two", "b", None)]
    path, first = write_qa_file(tmp_path, fmt, rows)
    with caplog.at_level(logging.WARNING):
        examples, report = read_qa(path, target_length=len, max_target_length=MAX_CHARS)
    assert [(e.question, e.answers, e.where) for e in examples] == [
        ("good one", ("yes",), f"{path}:{first}"), ("good two", ("b",), f"{path}:{first + 5}")]  # fmt: skip
    assert report.format == fmt and report.num_examples == 2 and report.answers_dropped == 0
    assert report.skipped == {"empty question": 1, "missing answers": 1, "not UTF-8": 1, "answer too long": 1}
    *per_line, summary = [r.getMessage() for r in caplog.records]
    assert [m.removeprefix("skipped ").split(" (")[0] for m in per_line] == [
        f"{path}:{first + i}: {reason}" for i, (_, _, reason) in enumerate(PROBLEM_ROWS, start=1)]  # fmt: skip
    assert summary == (
        f"{path}: read 2 example(s); skipped 4 line(s) (answer too long: 1, empty question: 1, missing answers: 1, "
        f"not UTF-8: 1); dropped 0 over-long answer(s); the first problem: {report.first_problem}")  # fmt: skip
    assert report.first_problem.startswith(f"{path}:{first + 1}: empty question")
    # strict: each problem alone, after a good line, raises with its line
    for row in PROBLEM_ROWS:
        path, first = write_qa_file(tmp_path, fmt, [("good one", "yes", None), row])
        with pytest.raises(MalformedLineError, match=f"^malformed line \\({path}:{first + 1}\\): {row[2]}"):
            read_qa(path, strict=True, target_length=len, max_target_length=MAX_CHARS)
    assert len(read_qa(path, strict=True).examples) == 2  # without a length limit the long answer is kept


@pytest.mark.parametrize("fmt", data.FORMATS)
def test_every_format_reads_a_byte_order_mark_and_crlf_line_ends(tmp_path, fmt):
    rows = [("first question", "yes", None), ("second", "b", None)]
    path, first = write_qa_file(tmp_path, fmt, rows)
    plain = read_qa(path).examples
    path.write_bytes(BOM + path.read_bytes().replace(b"\n", b"\r\n"))
    assert read_qa(path).examples == plain
    assert [(e.question, e.answers, e.where) for e in plain] == [
        ("first question", ("yes",), f"{path}:{first}"), ("second", ("b",), f"{path}:{first + 1}")]  # fmt: skip


@pytest.mark.parametrize("fmt", data.FORMATS)
@pytest.mark.parametrize("content", [b"", b"\n \r\n", BOM, "header"])
def test_an_empty_file_is_an_error_naming_it(tmp_path, fmt, content):
    path, _ = write_qa_file(tmp_path, fmt, [])
    if content == "header":
        content = b"[]" if fmt == "json" else b"question\tanswers\n" if fmt == "tsv" else b""
    path.write_bytes(content)
    with pytest.raises(InputFileError, match=rf"^input file \({path}\): the file is empty \(no examples\)$"):
        read_qa(path, format=fmt if fmt != "jsonl" else None)


def test_a_file_without_a_usable_example_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "", "answers": ["a"]}\n{"question": "q"}\n')
    reasons = r"\(empty question: 1, missing answers: 1\)"
    with pytest.raises(InputFileError, match=rf"no usable example: all 2 skipped {reasons}; the first problem: {path}:1: "):
        read_qa(path)


def test_missing_directory_unreadable_and_damaged_files_are_errors_naming_them(tmp_path):
    for name in ("missing.jsonl", "missing.tsv", "missing.json"):
        with pytest.raises(InputFileError, match=rf"^input file \({tmp_path / name}\): no such file$"):
            read_qa(tmp_path / name)
    (tmp_path / "folder.tsv").mkdir()
    with pytest.raises(InputFileError, match=r"folder.tsv\): a directory, not a file$"):
        read_qa(tmp_path / "folder.tsv")

    def refused(path, mode):
        raise PermissionError(13, "Permission denied", path)

    with pytest.raises(InputFileError, match=r"^input file \(x.tsv\): not readable \(permission denied\)$"):
        open_input("x.tsv", refused)
    damaged = tmp_path / "qa.jsonl.gz"
    damaged.write_bytes(gzip.compress(b'{"question": "q", "answers": ["a"]}\n' * 50)[:-30])
    with pytest.raises(InputFileError, match=r"qa.jsonl.gz\): cannot read it \(EOFError"):
        read_qa(damaged)


def test_deeply_nested_json_is_a_bad_line_not_a_crash(tmp_path):
    nested = "[" * 100_000
    path = tmp_path / "deep.jsonl"
    path.write_text(f'{{"question": "q", "answers": {nested}}}\n{nested}\n{{"question": "ok", "answers": ["a"]}}\n')
    examples, report = read_qa(path)
    assert [e.question for e in examples] == ["ok"] and report.skipped == {"bad JSON": 2}
    tsv = tmp_path / "deep.tsv"
    tsv.write_text(f"q\t{nested}\nok\t['a']\n")
    assert read_qa(tsv).report.skipped == {"bad answers": 1}
    array = tmp_path / "deep.json"
    array.write_text(f"[{nested}]")
    with pytest.raises(MalformedLineError, match="nested too deeply"):
        read_qa(array)


# ---------------------------------------------------------------------------------------------
# The batch iterator


def take(it, n):
    return [next(it) for _ in range(n)]


def test_iterator_is_deterministic_and_epochs_are_permutations():
    a = take(BatchIterator(10, 4, seed=3), 6)
    b = take(BatchIterator(10, 4, seed=3), 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # 2 batches per epoch (the remainder of 2 dropped): an epoch is 8 distinct examples
    for epoch in range(3):
        seen = np.concatenate(a[2 * epoch : 2 * epoch + 2])
        assert len(set(seen.tolist())) == 8
        assert np.array_equal(seen, BatchIterator(10, 4, seed=3).epoch_order(epoch)[:8])
    assert not np.array_equal(np.concatenate(a[0:2]), np.concatenate(a[2:4]))  # reshuffled each epoch
    assert not np.array_equal(a[0], take(BatchIterator(10, 4, seed=4), 1)[0])
    assert np.array_equal(np.concatenate(take(BatchIterator(10, 4, shuffle=False), 2)), np.arange(8))


def test_keep_remainder_covers_every_example_and_num_epochs_ends():
    it = BatchIterator(10, 4, seed=1, drop_remainder=False, num_epochs=2)
    batches = list(it)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(np.concatenate(batches[:3]).tolist()) == list(range(10))
    assert it.state()["epoch"] == 2


def test_restore_mid_epoch_continues_exactly():
    reference = take(BatchIterator(23, 6, seed=7), 12)  # 3 batches per epoch: crosses 3 epoch boundaries
    for stop in (1, 3, 5):
        it = BatchIterator(23, 6, seed=7)
        take(it, stop)
        state = json.loads(json.dumps(it.state()))  # what a checkpoint stores
        resumed = BatchIterator(23, 6, seed=7)
        resumed.restore(state)
        assert all(np.array_equal(x, y) for x, y in zip(take(resumed, 12 - stop), reference[stop:]))
    assert BatchIterator(23, 6, seed=7).state() == {
        "epoch": 0, "position": 0, "seed": 7, "num_examples": 23, "batch_size": 6, "shuffle": True,
        "drop_remainder": True}  # fmt: skip
    with pytest.raises(ValueError, match="num_examples: saved 23, now 24"):
        BatchIterator(24, 6, seed=7).restore(state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_make_up_the_single_process_global_batch(process_count):
    single = take(BatchIterator(50, 8, seed=5), 10)
    shards = [take(BatchIterator(50, 8, seed=5, process_index=p, process_count=process_count), 10)
              for p in range(process_count)]  # fmt: skip
    for step in range(10):
        parts = [shards[p][step] for p in range(process_count)]
        assert all(len(x) == 8 // process_count for x in parts)
        assert np.array_equal(np.concatenate(parts), single[step])
    # with the remainder kept, the short last batch of each epoch is split too
    kept = take(BatchIterator(10, 4, seed=2, drop_remainder=False), 6)
    kept_shards = [take(BatchIterator(10, 4, seed=2, drop_remainder=False, process_index=p,
                                      process_count=process_count), 6) for p in range(process_count)]  # fmt: skip
    for step in range(6):
        assert np.array_equal(np.concatenate([kept_shards[p][step] for p in range(process_count)]), kept[step])
    # a state saved on one process count resumes on another
    one = BatchIterator(50, 8, seed=5)
    take(one, 7)
    two = BatchIterator(50, 8, seed=5, process_index=1, process_count=2)
    two.restore(one.state())
    assert np.array_equal(next(two), single[7][4:])


def test_iterator_argument_checks():
    with pytest.raises(ValueError, match="not a multiple of process_count"):
        BatchIterator(10, 3, process_count=2)
    with pytest.raises(ValueError, match="make no full batch"):
        BatchIterator(3, 4)
    with pytest.raises(ValueError, match="process_index 2"):
        BatchIterator(10, 4, process_index=2, process_count=2)
