"""Documents into DPR-style passages (``rag-jax split-corpus``): each document's text in disjoint
runs of ``words`` words (``split_into_passages``), each passage keeping its document's title,
written as a DPR TSV (``id text title``) that ``rag-jax embed`` reads.

Documents: a JSONL file, one ``{"text": ..., "title": ..., "id": ...}`` object per line (``title``
and ``id`` optional), or plain text, a ``.txt`` file or a folder of them (sorted by name), one
document per file titled by the file's name without ``.txt``.

Passage ids are stable: ``<document id>_<n>`` for the document's n-th passage (from 0), where the
document id is its ``id``, else its title, else (JSONL without either) its line number. A passage's
id therefore changes only when its own document changes, whatever is added or removed elsewhere
(live corpus updates rely on that). Two documents with one id: the second is reported and skipped;
so is a malformed line (``--strict``: the first one stops the job), with its file and line.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator

from rag_jax.data.lines import BadLine, LineReporter, decode_line, json_line, numbered_lines, open_input
from rag_jax.errors import InputFileError
from rag_jax.retrieval.corpus import Passage, split_into_passages, write_passages_tsv

log = logging.getLogger(__name__)


def _jsonl_documents(path: str, report: LineReporter) -> Iterator[tuple[int, str, str, str]]:
    """``(line, document id, title, text)`` per well-formed line of a JSONL file."""
    with open_input(path) as f:
        for lineno, _, raw in numbered_lines(f, path):
            try:
                line = decode_line(raw)
                if not line.strip():
                    continue
                obj = json_line(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise BadLine('expected a JSON object with a string "text"')
                title = obj.get("title") or ""
                if not isinstance(title, str):
                    raise BadLine('"title" must be a string')
                doc_id = str(obj["id"]) if obj.get("id") not in (None, "") else title or str(lineno)
                yield lineno, doc_id, title, obj["text"]
            except BadLine as e:
                report(lineno, str(e))


def _text_documents(path: str) -> Iterator[tuple[int, str, str, str]]:
    """``(0, title, title, text)`` per ``.txt`` file (the title is the file name without ``.txt``)."""
    files = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".txt")] if os.path.isdir(path) \
        else [path]  # fmt: skip
    if not files:
        raise InputFileError("no .txt files in the folder", where=path)
    for file in files:
        with open_input(file) as f:
            text = f.read().decode("utf-8", errors="replace")
        title = os.path.basename(file)[: -len(".txt")] if file.endswith(".txt") else os.path.basename(file)
        yield 0, title, title, text


def split_documents(path: str, out: str, *, words: int = 100, strict: bool = False) -> dict:
    """Split the documents at ``path`` into passages written to the TSV ``out`` (atomically: an
    interrupted job leaves no partial file); returns ``{"documents", "passages", "skipped"}``."""
    report = LineReporter(path, strict, log)
    documents = _jsonl_documents(path, report) if path.endswith((".jsonl", ".json")) else _text_documents(path)
    seen: set[str] = set()

    def passages() -> Iterator[Passage]:
        for lineno, doc_id, title, text in documents:
            if doc_id in seen:
                report(lineno, f"a second document with id {doc_id!r}")
                continue
            seen.add(doc_id)
            for n, p in enumerate(split_into_passages(title, text, words)):
                yield Passage(f"{doc_id}_{n}", p.title, p.text)

    fd, partial = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), suffix=".partial")
    os.close(fd)
    try:
        count = write_passages_tsv(passages(), partial, keep_ids=True)
    except BaseException:
        os.remove(partial)
        raise
    os.replace(partial, out)
    report.summary()
    return {"documents": len(seen), "passages": count, "skipped": report.count}
