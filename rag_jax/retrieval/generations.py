"""Index generations: the corpus re-embedded with a snapshot of a document encoder in training,
and indexed, one folder per snapshot, built resumably and, optionally, split over processes.

Layout of ``root`` (a run's ``index_generations/``), one folder per generation, named by the
training step of its encoder snapshot::

    step-00000120/
        embeddings/           an ``embed_passages`` job (row shards + manifest)
        index/                the saved index over them (built in ``index.partial/``, then renamed)
        process-00001.done    process 1 of a split build has written its shards and its manifest
        COMPLETE              written last, atomically: the generation is finished

A folder without ``COMPLETE`` is unfinished (e.g. its build was killed) and ``build_generation``
finishes it: the embedding job resumes its missing shards, the index is rebuilt. Processes that split
a build share ``root`` (one file system); each writes only its own shards and done marker, process 0
the rest. Everything is a pure function of the snapshot, the corpus and the settings: one build, a
resumed one and a build split over processes give byte-identical embedding shards and the same
search results.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from typing import Callable, Iterable

from rag_jax.errors import InputFileError
from rag_jax.models.encoder import Encoder
from rag_jax.retrieval.corpus import PassageStore
from rag_jax.retrieval.embed import (
    EncodeFn,
    TokenizeFn,
    embed_passages,
    load_embeddings,
    num_shards,
    shard_path,
    write_json_atomic,
)
from rag_jax.retrieval.index import ExactIndex, ScannIndex, load_index, read_meta

COMPLETE = "COMPLETE"
INDEX_BUILDERS = {"exact": ExactIndex.build, "scann": ScannIndex.build}  # default settings, as build_corpus
GENERATION_FOLDER = re.compile(r"step-(\d{8,})")
DELETING_SUFFIX = ".deleting"
WAIT_TIMEOUT_S = 24 * 3600.0  # the other processes' share of a 21M-passage corpus can take hours


def generation_folder_name(step: int) -> str:
    """``step-00000120`` for step 120: zero-padded, so folder names sort by step."""
    return f"step-{step:08d}"


def index_kind(directory: str) -> str:
    """The kind of the index saved in ``directory``, "exact" or "scann", so a generation can be
    built like the run's configured index. A sharded index is refused: generations are unsharded."""
    meta = read_meta(directory)
    kind = meta.get("kind")
    if kind == "sharded":
        raise ValueError(f"{directory} holds a sharded index ({meta.get('shard_kind')!r} shards); index generations "
                         f"are built unsharded: use an unsharded {tuple(INDEX_BUILDERS)} index")  # fmt: skip
    if kind not in INDEX_BUILDERS:
        raise ValueError(f"{directory}: unknown index kind {kind!r}, expected one of {tuple(INDEX_BUILDERS)}")
    return kind


def snapshot_encode_fn(encoder: Encoder, params) -> EncodeFn:
    """``encode_fn(ids, mask) -> [B, D]`` of ``encoder``'s architecture and pooling with ``params``
    (a snapshot of its parameters in training) in place of its own; jitted, with params an argument,
    so snapshots of one encoder share one compiled program."""
    return dataclasses.replace(encoder, params=params).encode


class IndexGenerations:
    """The index generations of one run, under ``root`` (see the module docstring)."""

    def __init__(self, root: str):
        self.root = root

    def path(self, step: int) -> str:
        return os.path.join(self.root, generation_folder_name(step))

    def embeddings_dir(self, step: int) -> str:
        return os.path.join(self.path(step), "embeddings")

    def index_dir(self, step: int) -> str:
        return os.path.join(self.path(step), "index")

    def is_complete(self, step: int) -> bool:
        return os.path.isfile(os.path.join(self.path(step), COMPLETE))

    def steps(self) -> list[int]:
        """The steps of every generation folder, finished or not, ascending."""
        if not os.path.isdir(self.root):
            return []
        matches = (GENERATION_FOLDER.fullmatch(name) for name in os.listdir(self.root))
        return sorted(int(m.group(1)) for m in matches if m and os.path.isdir(os.path.join(self.root, m.group(0))))

    def complete_steps(self) -> list[int]:
        """The steps of the finished generations, ascending."""
        return [step for step in self.steps() if self.is_complete(step)]

    def load(self, step: int, store: PassageStore, **index_kwargs) -> tuple:
        """``(index, embeddings)`` of the finished generation of ``step``: ``load_index`` (``index_kwargs``
        go to the class's ``load``, e.g. ``devices``) and the memory-mapped embeddings, checked against
        ``store`` (the passage file they were embedded from)."""
        if not self.is_complete(step):
            raise InputFileError(f"the index generation of step {step} is unfinished (no {COMPLETE})",
                                 where=self.path(step))  # fmt: skip
        embeddings = load_embeddings(self.embeddings_dir(step), store=store)
        return load_index(self.index_dir(step), **index_kwargs), embeddings

    def prune(self, keep_steps: Iterable[int]) -> list[int]:
        """Delete every generation folder, finished or not, whose step is not in ``keep_steps`` (it
        must hold any generation still being built; one process prunes); returns the deleted steps. A folder is first
        renamed out of the ``step-*`` names, so one whose deletion is interrupted is never taken for a
        generation, and such leftovers are deleted here too."""
        keep = set(keep_steps)
        removed = [step for step in self.steps() if step not in keep]
        for step in removed:
            doomed = self.path(step) + DELETING_SUFFIX
            shutil.rmtree(doomed, ignore_errors=True)  # a leftover of the same name
            os.replace(self.path(step), doomed)
        if os.path.isdir(self.root):
            for name in os.listdir(self.root):
                if name.endswith(DELETING_SUFFIX) and GENERATION_FOLDER.fullmatch(name[: -len(DELETING_SUFFIX)]):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        return removed


def process_done_path(generations: IndexGenerations, step: int, process_index: int) -> str:
    return os.path.join(generations.path(step), f"process-{process_index:05d}.done")


def process_shards(total_shards: int, process_index: int, process_count: int) -> range:
    """The shards process ``process_index`` of ``process_count`` embeds: every ``process_count``-th."""
    return range(process_index, total_shards, process_count)


def wait_until(ready: Callable[[], bool], *, poll_s: float, timeout_s: float,
               what_is_missing: Callable[[], str]) -> None:  # fmt: skip
    """Return once ``ready()``; after ``timeout_s`` raise ``TimeoutError`` saying ``what_is_missing()``."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:g} s: {what_is_missing()}")
        time.sleep(poll_s)


def missing_parts(generations: IndexGenerations, step: int, total_shards: int, process_count: int) -> list[str]:
    """What the processes of a split build have yet to write: shard files and done markers."""
    emb_dir = generations.embeddings_dir(step)
    shards = [s for s in range(total_shards) if not os.path.exists(shard_path(emb_dir, s))]
    processes = [p for p in range(1, process_count) if not os.path.exists(process_done_path(generations, step, p))]
    parts = []
    if shards:
        owners = sorted({s % process_count for s in shards})
        parts.append(f"embedding shards {shards} (of processes {owners}) in {emb_dir}")
    if processes:
        parts.append(f"the done markers of processes {processes}")
    return parts


def save_index(embeddings, kind: str, directory: str) -> None:
    """Build a ``kind`` index over ``embeddings`` and save it to ``directory``, replacing whatever is
    there only once it is complete (built in ``directory.partial``, then renamed). The built index is
    dropped on return, so a loaded copy never coexists with it (an exact index lives on device)."""
    partial = directory + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # a build killed half-way
    INDEX_BUILDERS[kind](embeddings).save(partial)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)


def build_generation(
    generations: IndexGenerations,
    step: int,
    store: PassageStore,
    encode_fn: EncodeFn,
    tokenize_fn: TokenizeFn,
    *,
    index_kind: str,
    batch_size: int,
    shard_size: int,
    input_mode: str = "pair",
    dtype: str = "float32",
    process_index: int = 0,
    process_count: int = 1,
    encoder_name: str = "",
    progress: bool = False,
    wait_poll_s: float = 1.0,
    wait_timeout_s: float = WAIT_TIMEOUT_S,
) -> tuple:
    """Build (or finish) the index generation of ``step`` and return it loaded: ``(index, embeddings)``.

    ``encode_fn`` encodes with the encoder snapshot of ``step`` (``snapshot_encode_fn``); the other
    embedding settings are ``embed_passages``'. Process ``process_index`` of ``process_count`` (which
    all call this with the same arguments on one shared folder) embeds its shards
    (``process_shards``); process 0 then waits for every other process's shards, builds the
    ``index_kind`` index ("exact" or "scann", default settings), and writes ``COMPLETE``; the others
    wait for ``COMPLETE``. A wait past ``wait_timeout_s`` raises ``TimeoutError`` naming what is
    missing. A finished generation is only loaded.
    """
    if index_kind not in INDEX_BUILDERS:
        raise ValueError(f"index_kind must be one of {tuple(INDEX_BUILDERS)}, got {index_kind!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
    if generations.is_complete(step):
        return generations.load(step, store)
    emb_dir = generations.embeddings_dir(step)
    total_shards = num_shards(len(store), shard_size)

    def embed(shards: range) -> dict:
        return embed_passages(store, encode_fn, tokenize_fn, emb_dir, batch_size=batch_size, shard_size=shard_size,
                              dtype=dtype, input_mode=input_mode, encoder_name=encoder_name, progress=progress,
                              shards=shards)  # fmt: skip

    embed(process_shards(total_shards, process_index, process_count))
    wait = dict(poll_s=wait_poll_s, timeout_s=wait_timeout_s)
    if process_index != 0:
        done_marker = {"step": step, "process_count": process_count}
        write_json_atomic(process_done_path(generations, step, process_index), done_marker)
        unfinished = f"process 0 has not finished step {step}'s generation (no {COMPLETE} in {generations.path(step)})"
        wait_until(lambda: generations.is_complete(step), **wait, what_is_missing=lambda: unfinished)
        return generations.load(step, store)
    if process_count > 1:

        def missing() -> list[str]:
            return missing_parts(generations, step, total_shards, process_count)

        def what_is_missing() -> str:
            return f"step {step}: still missing " + "; ".join(missing())

        wait_until(lambda: not missing(), **wait, what_is_missing=what_is_missing)
        embed(range(total_shards))  # every shard is there: this only records the job as complete in its manifest
    save_index(load_embeddings(emb_dir, store=store), index_kind, generations.index_dir(step))
    completion = {"step": step, "index_kind": index_kind, "num_passages": len(store), "num_shards": total_shards}
    write_json_atomic(os.path.join(generations.path(step), COMPLETE), completion)
    return generations.load(step, store)
