"""Live corpus updates: add, replace and delete passages of a corpus (passages file + embeddings +
index) without embedding it again or retraining its index.

The updates file is JSONL, one update per line (blank lines ignored)::

    {"op": "add", "id": "w123_0", "title": "Ada Lovelace", "text": "Ada Lovelace was ..."}
    {"op": "replace", "id": "17", "title": "...", "text": "..."}
    {"op": "delete", "id": "42"}

``add`` needs an id new to the corpus, ``replace`` and ``delete`` an id in it (the file's own ids, as
``PassageStore.row_of`` finds them); ``text`` must be non-empty, ``title`` may be left out. An id
may be updated once per file. Any bad line (bad JSON, an unknown op or key, a missing text, an
unknown or repeated id) stops everything before anything is written, with one error naming
``file:line``.

``update_corpus`` embeds only the added and replaced passages (with the embedding job's encoder
input and dtype), updates the index through its own mutation (``index.upsert`` / ``index.delete``:
ScaNN's upsert and delete, which place new vectors in the trained tree and encode them with the trained
codebooks, retraining neither; an exact index's rows on the devices), and writes the updated corpus
to a new folder: ``passages.tsv`` (or ``.jsonl``: the corpus's own format and columns, unchanged
records copied byte for byte), ``embeddings/`` (an embedding folder for it) and ``index/``.

Rows (``rag_jax.retrieval.index.base``): the deleted passages go first, from the highest row down,
each taking the place of the current last row (ScaNN's own order; within each shard of a sharded
index); the replaced passages keep their rows; the added ones take the last rows, in file order. So
passages that survive keep their row unless they were among the last rows, which fill the holes; the
store, the embeddings and the index agree row for row, and a deleted passage is never returned.

The old corpus is left as it was: a ``Retriever`` serving from it switches to the new one with
``with_corpus(result.store, result.index, result.embeddings)`` (the hot-swap, also the path for a
full rebuild). The ``index`` passed in is updated in place, so load a copy for the update when a
retriever still searches the old one. A ScaNN index keeps the tree and codebooks of its build:
``meta["updates"]`` counts the rows changed since; rebuild (``rag-jax build-index``) when that grows
large (``rag-jax update-index`` says so past 25%), sooner when the new passages are on new topics:
at 200,000 x 64, up to 25% changed kept recall@10 within about 0.01 of a fresh build at any number of
leaves searched, 50% from new clusters cost up to 0.09 at few leaves and 0.008 at the tuned settings
(experiments/bench/index_updates.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from rag_jax.data.lines import BadLine, MalformedLineError, decode_line, json_line, numbered_lines, open_input
from rag_jax.errors import InputFileError
from rag_jax.retrieval.corpus import Passage, PassageStore, stored_passage, write_corpus_rows
from rag_jax.retrieval.embed import (
    EncodeFn,
    TokenizeFn,
    encode_passages,
    load_embeddings,
    read_manifest,
    write_embedding_rows,
)

OPS = ("add", "replace", "delete")


@dataclasses.dataclass(frozen=True)
class Update:
    """One line of an updates file: ``op``, the passage (only its id for a delete) and the line."""

    op: str
    passage: Passage
    line: int


@dataclasses.dataclass(frozen=True)
class UpdatePlan:
    """Updates resolved against a store: the rows deleted, the rows replaced and their new passages,
    and the passages added (in file order)."""

    deleted_rows: np.ndarray
    replaced_rows: np.ndarray
    replacements: list[Passage]
    additions: list[Passage]


@dataclasses.dataclass(frozen=True)
class UpdatedCorpus:
    """What ``update_corpus`` wrote and opened: the new store, embeddings and (updated) index, their
    paths, the counts (``added``, ``replaced``, ``deleted``, ``before``, ``after``) and the seconds spent
    (``embed``, ``index``, ``write``)."""

    store: PassageStore
    embeddings: Any
    index: Any
    passages_path: str
    embeddings_dir: str
    index_dir: str
    counts: dict
    seconds: dict


def _parse_update(line: str) -> tuple[str, Passage]:
    obj = json_line(line)
    if not isinstance(obj, dict):
        raise BadLine('expected a JSON object such as {"op": "add", "id": "...", "title": "...", "text": "..."}')
    op = obj.get("op")
    if op not in OPS:
        raise BadLine(f'"op" must be one of {", ".join(OPS)}, got {op!r}')
    allowed = ("op", "id") if op == "delete" else ("op", "id", "title", "text")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise BadLine(f"unexpected key(s) {', '.join(map(repr, unknown))} (\"{op}\" takes {', '.join(allowed)})")
    passage_id = obj.get("id")
    if isinstance(passage_id, bool) or not isinstance(passage_id, (str, int)) or not str(passage_id).strip():
        raise BadLine('"id" must be a non-empty string or integer')
    passage_id = str(passage_id)
    if any(c in passage_id for c in "\t\r\n"):
        raise BadLine('"id" must not hold a tab or a line break')
    if op == "delete":
        return op, Passage(passage_id, "", "")
    text, title = obj.get("text"), obj.get("title", "")
    if not isinstance(text, str) or not text.strip():
        raise BadLine(f'"{op}" needs a non-empty "text"')
    if not isinstance(title, str):
        raise BadLine('"title" must be a string')
    return op, Passage(passage_id, title, text)


def read_updates(path: str) -> list[Update]:
    """The updates of a JSONL file (module docstring); ``MalformedLineError`` naming ``path:line`` at
    the first bad line, ``InputFileError`` when there is none."""
    updates, first_line = [], {}
    with open_input(path) as f:
        for lineno, _, raw in numbered_lines(f, path):
            if not raw.strip():
                continue
            try:
                op, passage = _parse_update(decode_line(raw))
            except BadLine as e:
                raise MalformedLineError(str(e), where=f"{path}:{lineno}") from None
            if passage.id in first_line:
                raise MalformedLineError(f"id {passage.id} is updated twice (first at line {first_line[passage.id]})",
                                         where=f"{path}:{lineno}")  # fmt: skip
            first_line[passage.id] = lineno
            updates.append(Update(op, passage, lineno))
    if not updates:
        raise InputFileError("no updates (the file is empty)", where=path)
    return updates


def plan_updates(store: PassageStore, updates: list[Update], path: str = "updates") -> UpdatePlan:
    """Resolve ``updates`` (read from ``path``) against ``store``; ``InputFileError`` (what: "update")
    naming ``path:line`` for an add of an id the store has, or a replace or delete of one it lacks."""
    deleted, replaced, replacements, additions = [], [], [], []
    for update in updates:
        try:
            row = store.row_of(update.passage.id)
        except KeyError:
            row = None
        where = f"{path}:{update.line}"
        if update.op == "add" and row is not None:
            raise InputFileError(f'id {update.passage.id} is already in the corpus (row {row}): use "op": "replace"',
                                 where=where, what="update")  # fmt: skip
        if update.op != "add" and row is None:
            raise InputFileError(f"no passage has id {update.passage.id} in {store.path}", where=where, what="update")
        if update.op == "add":
            additions.append(stored_passage(update.passage, store.format))
        elif update.op == "replace":
            replaced.append(row)
            replacements.append(stored_passage(update.passage, store.format))
        else:
            deleted.append(row)
    if len(deleted) == len(store):
        raise InputFileError(f"deletes all {len(store)} passages of the corpus: build a new one", where=path, what="update")
    return UpdatePlan(np.array(deleted, np.int64), np.array(replaced, np.int64), replacements, additions)


def apply_to_index(index, plan: UpdatePlan, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``plan`` to ``index`` (``vectors``: the replacements' then the additions', [R + A, D]):
    ``index.delete``, then one ``index.upsert``. Returns ``(rows, order)``: ``rows [size after]`` the
    store row at each new row, -1 where a new vector is, and ``order`` the indices into ``vectors`` (and
    into replacements + additions) of those -1 rows, top to bottom."""
    source = index.delete(plan.deleted_rows)
    new_row = np.full(len(source) + len(plan.deleted_rows), -1, np.int64)
    new_row[source] = np.arange(len(source))
    targets = np.concatenate([new_row[plan.replaced_rows], len(source) + np.arange(len(plan.additions))]).astype(np.int64)
    index.upsert(targets, np.asarray(vectors, np.float32))
    rows = np.concatenate([source, np.full(len(plan.additions), -1, np.int64)])
    rows[targets] = -1
    return rows, np.argsort(targets)


def update_corpus(
    store: PassageStore,
    embeddings_dir: str,
    index,
    updates_path: str,
    out_dir: str,
    encode_fn: EncodeFn,
    tokenize_fn: TokenizeFn,
    *,
    batch_size: int = 64,
) -> UpdatedCorpus:
    """Apply the updates file ``updates_path`` to the corpus ``store`` + ``embeddings_dir`` (an embedding
    folder of it) + ``index`` (over those embeddings; updated in place) and write the updated corpus to
    ``out_dir`` (new or empty): ``passages.<tsv|jsonl>``, ``embeddings/``, ``index/`` (module docstring).
    Only the added and replaced passages are encoded, by ``encode_fn`` / ``tokenize_fn`` (the encoder
    the embeddings were made with) with the embedding job's input mode and dtype. Everything is
    checked before anything is written."""
    manifest = read_manifest(embeddings_dir)
    embeddings = load_embeddings(embeddings_dir, mmap=True, store=store)
    if (index.size, index.dim) != tuple(embeddings.shape):
        raise InputFileError(f"the index holds [{index.size}, {index.dim}] but the embeddings are {list(embeddings.shape)}: "
                             "pass the index built from them", where=embeddings_dir)  # fmt: skip
    plan = plan_updates(store, read_updates(updates_path), updates_path)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise InputFileError("exists and is not empty: the updated corpus goes to a new folder", where=out_dir)
    new_passages = plan.replacements + plan.additions
    start = time.perf_counter()
    vectors = np.zeros((0, index.dim), np.float32)
    if new_passages:
        vectors = encode_passages(new_passages, encode_fn, tokenize_fn, batch_size=batch_size, dtype=manifest["dtype"],
                                  input_mode=manifest["input_mode"])  # fmt: skip
        if vectors.shape[1] != index.dim:
            raise ValueError(f"the encoder gives {vectors.shape[1]}-dim vectors, the corpus's are {index.dim}-dim")
    vectors = vectors.astype(np.float32)  # as stored (e.g. rounded to bfloat16): what a fresh build would index
    embedded = time.perf_counter()
    rows, order = apply_to_index(index, plan, vectors)
    indexed = time.perf_counter()

    os.makedirs(out_dir, exist_ok=True)
    passages_path = os.path.join(out_dir, f"passages.{store.format}")
    write_corpus_rows(store, passages_path, rows, [new_passages[i] for i in order])
    new_store = PassageStore.open(passages_path)
    _check_ids(new_store, store, rows, [new_passages[i] for i in order])
    fingerprint = new_store.fingerprint
    settings = {**manifest, "source": {k: fingerprint[k] for k in ("size", "mtime_ns", "num_passages")},
                "updated_from": {"embeddings": os.path.abspath(embeddings_dir), "updates": os.path.abspath(updates_path)}}  # fmt: skip
    embeddings_out, index_out = os.path.join(out_dir, "embeddings"), os.path.join(out_dir, "index")
    write_embedding_rows(embeddings, embeddings_out, rows, vectors[order], settings)
    index.save(index_out)
    written = time.perf_counter()
    counts = {"added": len(plan.additions), "replaced": len(plan.replacements), "deleted": len(plan.deleted_rows),
              "before": len(store), "after": len(new_store)}  # fmt: skip
    seconds = {"embed": embedded - start, "index": indexed - embedded, "write": written - indexed}
    return UpdatedCorpus(new_store, load_embeddings(embeddings_out, mmap=True, store=new_store), index, passages_path,
                         embeddings_out, index_out, counts, seconds)  # fmt: skip


def _check_ids(new_store: PassageStore, store: PassageStore, rows: np.ndarray, new_passages: list[Passage]) -> None:
    """The written file reads back in the planned order: every id at a new row, and the old ids at the
    rows that moved, are where they should be."""
    if len(new_store) != len(rows):
        raise RuntimeError(f"{new_store.path} reads back as {len(new_store)} passages, expected {len(rows)}")
    new = np.flatnonzero(rows == -1)
    moved = np.flatnonzero((rows != -1) & (rows != np.arange(len(rows))))
    expected = [p.id for p in new_passages] + [str(store.ids[r]) for r in rows[moved].tolist()]
    found = [str(new_store.ids[i]) for i in np.concatenate([new, moved]).tolist()]
    if found != expected:
        raise RuntimeError(f"{new_store.path} does not read back in the planned row order")
