"""The passage corpus: reading DPR TSV / JSONL files, 100-word splitting, and a random-access store.

File formats (one record per line; records never span lines, which DPR's files respect):

* **TSV** (DPR ``psgs_w100.tsv``): an optional header ``id<TAB>text<TAB>title`` (columns found by
  name when the header is there, else taken in that order), fields parsed with the ``csv`` module's
  default dialect and ``delimiter="\\t"``, as DPR's own code reads them: a field may be wrapped in
  double quotes, with inner quotes doubled (``"a ""b"" c"`` -> ``a "b" c``).
* **JSONL**: one object per line with ``"id"`` and ``"text"`` (and ``"title"``, "" when missing).

Files are UTF-8, with or without a byte order mark, with ``\n`` or ``\r\n`` line ends. A missing,
unreadable or empty file (no record), or one without a usable record, raises ``InputFileError``
naming it.

Malformed lines: a line with the wrong column count, bad quoting, bad JSON, missing keys, bytes that
are not UTF-8, or an empty text is **skipped and counted**. Each is logged (``logging``, logger
``rag_jax.retrieval.corpus``) as ``skipped path:line: reason``: the first 100 at WARNING, the rest
at DEBUG, then one WARNING summary with the count. With ``strict=True`` the first one raises
``MalformedLineError`` (``malformed line (path:line): reason``). Blank lines are not records and are
skipped silently.

Repeated ids: the **first** passage with an id is kept; each later one is skipped, counted and
reported the same way as ``path:line: duplicate id X (first at line N)`` (``strict=True`` stops at
the first). ``PassageStore`` applies this when it indexes the file, and everything reads the corpus
through it (``read_passages``, ``embed``, ``build-index``, BM25, the retriever), so ids are unique
everywhere. Row numbers count the *kept* records from 0, and are the same everywhere: the store's
offsets, the embedding rows (``embed.py``) and the index ids.

``PassageStore`` gives random access without holding the text in Python: one scan of the file
writes, in a sidecar folder ``<file>.idx/`` (or ``cache_dir``), the byte offset (int64) and length
(int32) of every kept record and its id, plus a JSON with the source's size and mtime; the sidecar
is rebuilt when those change. ``store[i]`` reads one record with ``os.pread`` (thread-safe, no
shared file position), contiguous ranges are read with one ``pread``. For the 21M-passage
Wikipedia file (13 GiB) the sidecar is 21M x 12 bytes + the ids (int64 when every id is an integer,
as in DPR's file; otherwise a NumPy unicode array, which costs 4 bytes per character per id).
"""

from __future__ import annotations

import array
import csv
import dataclasses
import io
import json
import logging
import os
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from rag_jax.data.lines import (
    BadLine,
    LineReporter,
    MalformedLineError,
    decode_line,
    json_line,
    numbered_lines,
    open_input,
    tsv_fields,
)
from rag_jax.errors import ConfigError, InputFileError

logger = logging.getLogger(__name__)

SIDECAR_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Passage:
    """One passage; ``id`` is the id exactly as written in the file."""

    id: str
    title: str
    text: str


def split_into_passages(title: str, text: str, words: int = 100) -> list[Passage]:
    """Split a document into disjoint passages of ``words`` whitespace-separated words (the last
    one shorter), each keeping the document's title. Passage ids are "" (the writer numbers them).

    Words are maximal runs of non-whitespace (``str.split()``), joined by single spaces. The
    transformers RAG example (``use_own_knowledge_dataset.py``) splits on the single character " "
    instead, so there runs of spaces and newlines count differently.
    """
    if words < 1:
        raise ValueError(f"words must be >= 1, got {words}")
    tokens = text.split()
    return [Passage("", title, " ".join(tokens[i : i + words])) for i in range(0, len(tokens), words)]


def write_passages_tsv(passages: Iterable[Passage], path: str, first_id: int = 1, *, keep_ids: bool = False) -> int:
    """Write passages as a DPR TSV (header ``id text title``, ids ``first_id, first_id + 1, ...``, or each
    passage's own id with ``keep_ids``; csv quoting). Tabs and line breaks inside fields become spaces
    so every record stays on one line. Returns the number of passages written."""
    count = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "text", "title"])
        for count, p in enumerate(passages, start=1):
            passage_id = p.id if keep_ids else first_id + count - 1
            writer.writerow([passage_id, " ".join(p.text.split()), " ".join(p.title.split())])
    return count


# ---------------------------------------------------------------------------------------------
# Parsing


def _detect_format(path: str, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("tsv", "jsonl"):
            raise ConfigError(f"format must be 'tsv' or 'jsonl', got {fmt!r}")
        return fmt
    if path.endswith(".gz"):
        raise InputFileError("compressed files have no random access; decompress it first (gunzip)", where=path)
    if path.endswith((".jsonl", ".json")):
        return "jsonl"
    if path.endswith((".tsv", ".txt")):
        return "tsv"
    raise InputFileError("cannot tell the format from the name; pass format='tsv' or 'jsonl'", where=path)


class _TsvParser:
    """Parses TSV lines; the header (if any) fixes which column is which."""

    def __init__(self, columns: Sequence[int] = (0, 1, 2), num_fields: int = 3):
        self.columns = tuple(columns)  # positions of id, text, title
        self.num_fields = num_fields

    def header(self, line: str, where: str) -> bool:
        """True (and columns set) when ``line`` (at ``where``) is a header."""
        fields = tsv_fields(line)
        missing = [c for c in ("id", "text", "title") if c not in fields]
        if missing:
            if fields[0] == "id":
                raise MalformedLineError(f"TSV header {fields} lacks the column(s) {missing}", where=where)
            return False
        self.columns = tuple(fields.index(c) for c in ("id", "text", "title"))
        self.num_fields = len(fields)
        return True

    def __call__(self, line: str) -> Passage:
        fields = tsv_fields(line)
        if len(fields) != self.num_fields:
            raise BadLine(f"expected {self.num_fields} tab-separated columns, found {len(fields)}")
        i, x, t = self.columns
        return Passage(fields[i], fields[t], fields[x])


def _parse_jsonl(line: str) -> Passage:
    obj = json_line(line)
    if not isinstance(obj, dict) or "id" not in obj or "text" not in obj:
        raise BadLine('expected a JSON object with "id" and "text"')
    title = obj.get("title") or ""
    if not isinstance(obj["text"], str) or not isinstance(title, str):
        raise BadLine('"text" and "title" must be strings')
    return Passage(str(obj["id"]), title, obj["text"])


def _scan(path: str, tsv: _TsvParser | None, report: LineReporter) -> Iterator[tuple[int, int, int, Passage]]:
    """Yield ``(line, byte offset, byte length, passage)`` for every well-formed record, in file
    order; ``InputFileError`` at the end when there was none. ``tsv`` is a fresh TSV parser (it
    learns the header), None for JSONL."""
    header_checked, kept = tsv is None, 0
    with open_input(path) as f:
        for lineno, start, raw in numbered_lines(f, path):
            if not raw.strip():
                continue
            try:
                line = decode_line(raw)
                if not header_checked:
                    header_checked = True
                    if tsv.header(line, f"{path}:{lineno}"):
                        continue
                passage = tsv(line) if tsv is not None else _parse_jsonl(line)
                if not passage.text.strip():
                    raise BadLine("empty text")
            except BadLine as e:
                report(lineno, str(e))
                continue
            kept += 1
            yield lineno, start, len(raw), passage
    report.summary()
    if not kept and report.count:
        line, reason = report.first
        raise InputFileError(f"no usable passage: all {report.count} line(s) malformed; the first: line {line}: "
                             f"{reason}", where=path)  # fmt: skip
    if not kept:
        raise InputFileError("the file is empty (no passages)", where=path)


def read_passages(path: str, *, format: str | None = None, strict: bool = False) -> Iterator[Passage]:
    """Stream the passages of a TSV or JSONL file in order: the rows of a ``PassageStore`` indexed in
    a temporary folder (malformed lines and repeated ids handled as the module docstring says)."""
    with (
        tempfile.TemporaryDirectory() as sidecar,
        PassageStore.open(path, format=format, strict=strict, cache_dir=sidecar) as store,
    ):
        for batch in store.iter_batches(1024):
            yield from batch


# ---------------------------------------------------------------------------------------------
# The store


def file_fingerprint(path: str) -> dict:
    """What identifies a version of a file cheaply: its size and modification time."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class _IdCollector:
    """Collects ids compactly: int64 while every id is a plain integer (DPR), else strings."""

    def __init__(self):
        self.ints, self.strs = array.array("q"), None

    def add(self, passage_id: str) -> None:
        if self.strs is None:
            try:
                value = int(passage_id)
                if str(value) == passage_id:
                    self.ints.append(value)
                    return
            except (ValueError, OverflowError):
                pass
            self.strs = [str(v) for v in self.ints]
        self.strs.append(passage_id)

    def array(self) -> np.ndarray:
        return np.array(self.ints, dtype=np.int64) if self.strs is None else np.array(self.strs, dtype=str)


def _save_npy(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _repeated_rows(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, firsts)``: the rows whose id an earlier row already has, in row order, and the first
    row with that id for each."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts_group = np.ones(len(ids), bool)
    starts_group[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group_start = np.maximum.accumulate(np.where(starts_group, np.arange(len(ids)), 0))
    repeats = np.flatnonzero(~starts_group)
    rows, firsts = order[repeats], order[group_start[repeats]]
    by_row = np.argsort(rows)
    return rows[by_row], firsts[by_row]


def build_sidecar(path: str, sidecar: str, *, format: str | None = None, strict: bool = False, progress: bool = False) -> dict:
    """Scan ``path`` once and write the offsets, lengths and ids of its records into ``sidecar``
    (malformed lines and repeated ids skipped, as the module docstring says)."""
    fmt = _detect_format(path, format)
    fingerprint = file_fingerprint(path)
    malformed, duplicates = LineReporter(path, strict, logger), LineReporter(path, strict, logger)
    lines, offsets, lengths, ids = array.array("q"), array.array("q"), array.array("i"), _IdCollector()
    tsv = _TsvParser() if fmt == "tsv" else None
    records = _scan(path, tsv, malformed)
    if progress:
        records = tqdm(records, desc=f"indexing {os.path.basename(path)}", unit=" passages", mininterval=2.0)
    for lineno, start, length, passage in records:
        lines.append(lineno)
        offsets.append(start)
        lengths.append(length)
        ids.add(passage.id)
    ids_array, lines_array = ids.array(), np.array(lines, dtype=np.int64)
    rows, firsts = _repeated_rows(ids_array)
    for row, first in zip(rows.tolist(), firsts.tolist()):
        duplicates(int(lines_array[row]), f"duplicate id {ids_array[row]} (first at line {lines_array[first]})")
    duplicates.summary("line(s) with a repeated id")
    keep = np.ones(len(ids_array), bool)
    keep[rows] = False
    os.makedirs(sidecar, exist_ok=True)
    _save_npy(os.path.join(sidecar, "offsets.npy"), np.array(offsets, dtype=np.int64)[keep])
    _save_npy(os.path.join(sidecar, "lengths.npy"), np.array(lengths, dtype=np.int32)[keep])
    _save_npy(os.path.join(sidecar, "ids.npy"), ids_array[keep])
    meta = {
        "version": SIDECAR_VERSION,
        "source": os.path.abspath(path),
        "format": fmt,
        "tsv_columns": None if tsv is None else {"positions": list(tsv.columns), "num_fields": tsv.num_fields},
        "fingerprint": fingerprint,
        "num_passages": int(keep.sum()),
        "num_malformed": malformed.count,
        "num_duplicates": duplicates.count,
        "first_problem": min(filter(None, (malformed.first, duplicates.first)), default=None),
    }
    tmp = os.path.join(sidecar, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(sidecar, "meta.json"))
    return meta


def _load_meta(sidecar: str) -> dict | None:
    try:
        with open(os.path.join(sidecar, "meta.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


class PassageStore:
    """Random access to the passages of one TSV/JSONL file by row (0 .. len-1) and by id.

    Open with ``PassageStore.open(path)``; it is a context manager and can be pickled (it reopens
    the file). Nothing but the offsets, lengths and ids arrays is held in memory.
    """

    def __init__(self, path: str, sidecar: str, meta: dict):
        self.path, self.sidecar, self.meta = path, sidecar, meta
        self.format = meta["format"]
        self.offsets = np.load(os.path.join(sidecar, "offsets.npy"), mmap_mode="r")
        self.lengths = np.load(os.path.join(sidecar, "lengths.npy"), mmap_mode="r")
        self.ids = np.load(os.path.join(sidecar, "ids.npy"), mmap_mode="r")
        self._fd = os.open(path, os.O_RDONLY)
        self._id_order = self._sorted_ids = None
        columns = meta["tsv_columns"]
        self._tsv = None if columns is None else _TsvParser(columns["positions"], columns["num_fields"])

    @classmethod
    def open(
        cls,
        path: str,
        *,
        format: str | None = None,
        strict: bool = False,
        cache_dir: str | None = None,
        progress: bool = False,
    ) -> "PassageStore":
        """Open ``path``, (re)building its sidecar index when missing or when the file changed
        (size or mtime). ``cache_dir`` puts the sidecar there instead of next to the file. With
        ``strict=True`` a file with any malformed line or repeated id is refused."""
        open_input(path).close()  # a missing, directory or unreadable path fails here, naming it
        sidecar = cache_dir or path + ".idx"
        meta = _load_meta(sidecar)
        fresh = (
            meta is not None
            and meta.get("version") == SIDECAR_VERSION
            and meta.get("fingerprint") == file_fingerprint(path)
            and (format is None or meta.get("format") == format)
        )
        if not fresh:
            meta = build_sidecar(path, sidecar, format=format, strict=strict, progress=progress)
        elif strict and meta["first_problem"]:
            line, reason = meta["first_problem"]
            more = meta["num_malformed"] + meta["num_duplicates"] - 1
            raise MalformedLineError(f"{reason} (and {more} more skipped line(s))" if more else reason,
                                     where=f"{path}:{line}")  # fmt: skip
        return cls(path, sidecar, meta)

    @property
    def fingerprint(self) -> dict:
        """Identifies the source file version (and the row numbering derived from it)."""
        return {"path": os.path.abspath(self.path), **self.meta["fingerprint"], "num_passages": len(self)}

    def __len__(self) -> int:
        return len(self.offsets)

    def _parse(self, raw: bytes) -> Passage:
        line = raw.decode("utf-8").rstrip("\r\n")
        return self._tsv(line) if self._tsv is not None else _parse_jsonl(line)

    def _row(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for a store of {n} passages")
        return i % n

    def __getitem__(self, i: int) -> Passage:
        i = self._row(i)
        return self._parse(os.pread(self._fd, int(self.lengths[i]), int(self.offsets[i])))

    def get_many(self, rows: Sequence[int] | np.ndarray) -> list[Passage]:
        """Passages at ``rows`` (any order, repeats allowed)."""
        return [self[i] for i in np.asarray(rows).reshape(-1).tolist()]

    def slice(self, start: int, stop: int) -> list[Passage]:
        """Passages ``start .. stop-1``, read with one ``pread``."""
        start, stop = max(start, 0), min(stop, len(self))
        if start >= stop:
            return []
        base = int(self.offsets[start])
        end = int(self.offsets[stop - 1]) + int(self.lengths[stop - 1])
        buf = os.pread(self._fd, end - base, base)
        return [
            self._parse(buf[o - base : o - base + n])
            for o, n in zip(self.offsets[start:stop].tolist(), self.lengths[start:stop].tolist())
        ]

    def iter_batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[list[Passage]]:
        """Consecutive batches of passages from row ``start`` to ``stop`` (the end by default)."""
        stop = len(self) if stop is None else min(stop, len(self))
        for a in range(start, stop, batch_size):
            yield self.slice(a, min(a + batch_size, stop))

    def row_of(self, passage_id: str | int) -> int:
        """The row of the passage with this id; KeyError if none."""
        if self._sorted_ids is None:
            self._id_order = np.argsort(self.ids, kind="stable")
            self._sorted_ids = self.ids[self._id_order]
        if self.ids.dtype.kind == "i":
            key = _int_or_none(passage_id)
            if key is None:
                raise KeyError(passage_id)
        else:
            key = str(passage_id)
        j = int(np.searchsorted(self._sorted_ids, key))
        if j == len(self._sorted_ids) or self._sorted_ids[j] != key:
            raise KeyError(passage_id)
        return int(self._id_order[j])

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "PassageStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    def __reduce__(self):
        return (_reopen, (self.path, self.sidecar))


# ---------------------------------------------------------------------------------------------
# Writing an edited copy


COPY_BLOCK = 65536  # records read with one pread when copying


def stored_passage(passage: Passage, format: str) -> Passage:
    """``passage`` as a file of ``format`` gives it back: in TSV, runs of whitespace (tabs and line
    breaks included) in the title and text become single spaces, as ``write_passages_tsv`` writes them."""
    if format != "tsv":
        return passage
    return Passage(passage.id, " ".join(passage.title.split()), " ".join(passage.text.split()))


def _tsv_header(store: PassageStore) -> bytes:
    """The store's header line (its first decodable non-blank line, when that is a header), else
    ``id text title``: the columns ``store``'s records are in."""
    with open_input(store.path) as f:
        for lineno, _, raw in numbered_lines(f, store.path):
            if not raw.strip():
                continue
            try:
                line = decode_line(raw)
            except BadLine:
                continue
            if _TsvParser().header(line, f"{store.path}:{lineno}"):
                return line.encode("utf-8") + b"\n"
            break
    return b"id\ttext\ttitle\n"


def _new_record(store: PassageStore, passage: Passage) -> bytes:
    if store.format == "jsonl":
        return (json.dumps({"id": passage.id, "title": passage.title, "text": passage.text}, ensure_ascii=False) + "\n").encode()
    passage = stored_passage(passage, "tsv")
    fields = [""] * store._tsv.num_fields
    for position, value in zip(store._tsv.columns, (passage.id, passage.text, passage.title)):
        fields[position] = value
    out = io.StringIO()
    csv.writer(out, delimiter="\t", lineterminator="\n").writerow(fields)
    return out.getvalue().encode("utf-8")


def write_corpus_rows(store: PassageStore, path: str, rows: np.ndarray, passages: Sequence[Passage]) -> None:
    """Write a corpus file in ``store``'s format (TSV with its header and columns, or JSONL) whose record
    ``i`` is the store's row ``rows[i]`` copied byte for byte, or, where ``rows[i]`` is -1, the next of
    ``passages`` (TSV: as ``stored_passage``). Opened as a ``PassageStore`` its row ``i`` is record ``i``
    when the new passages have text and ids that are new to it (the caller checks). Written to a temporary
    name and renamed; runs of consecutive rows are copied ``COPY_BLOCK`` records per read."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    if int((rows == -1).sum()) != len(passages):
        raise ValueError(f"{int((rows == -1).sum())} rows marked new but {len(passages)} passages given")
    starts = np.flatnonzero(np.concatenate([[True], (np.diff(rows) != 1) | (rows[1:] == -1) | (rows[:-1] == -1)]))
    stops = np.append(starts[1:], len(rows))
    new = iter(passages)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        if store.format == "tsv":
            f.write(_tsv_header(store))
        for start, stop in zip(starts.tolist(), stops.tolist()):
            if rows[start] == -1:
                f.write(_new_record(store, next(new)))
                continue
            for a in range(int(rows[start]), int(rows[start]) + stop - start, COPY_BLOCK):
                b = min(a + COPY_BLOCK, int(rows[start]) + stop - start)
                offsets, lengths = store.offsets[a:b].astype(np.int64), store.lengths[a:b].astype(np.int64)
                base = int(offsets[0])
                buf = os.pread(store._fd, int(offsets[-1] + lengths[-1]) - base, base)
                if np.array_equal(offsets[1:], offsets[:-1] + lengths[:-1]):  # no skipped line between them
                    f.write(buf if buf.endswith(b"\n") else buf + b"\n")  # the file's last line may lack one
                else:
                    f.writelines(buf[o - base : o - base + n].rstrip(b"\r\n") + b"\n"
                                 for o, n in zip(offsets.tolist(), lengths.tolist()))  # fmt: skip
    os.replace(tmp, path)


def _int_or_none(x) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _reopen(path: str, sidecar: str) -> PassageStore:
    return PassageStore(path, sidecar, _load_meta(sidecar))
