"""Run configs: Python files with ``get_config(arg)`` returning an ``ml_collections.ConfigDict``,
plus command-line overrides (``--config experiments/configs/tiny.py:arg --config.rag.k=10``).

``default_config()`` is the schema: every field a run reads, with its default. A config file starts
from it and changes what its experiment needs; an override must name a field that exists (a typo is
an error, not a silently ignored setting) and is parsed by the type of the field's current value.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import os
from pathlib import Path

import ml_collections

from rag_jax.rag import objective


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/default"
    c.seed = 0

    c.data = dict(
        train="",  # QA file (JSONL / DPR JSON / question<TAB>answers TSV / {"input","target"} / FEVER)
        dev="",
        test="",
        format="",  # "" = by file extension
        max_question_length=32,  # question encoder tokens
        max_target_length=16,  # generator label tokens (answers longer than this are reported)
        max_source_length=64,  # closed-book generator input (the question alone)
        strict=False,  # True: stop at the first bad line instead of skipping and counting
    )
    c.corpus = dict(
        passages="",  # DPR tsv or JSONL passages
        embeddings="",  # `rag-jax embed` output directory
        index="",  # `rag-jax build-index` output directory
        retriever="dense",  # dense (q . d over the index) | bm25 (built in memory from the passages; the
        # question encoder is frozen and the BM25 scores are the retrieval logits)
    )
    c.model = dict(
        rag="",  # a transformers RAG folder; or the two parts below
        question_encoder="",  # DPR question encoder / BERT / sentence-transformers folder
        generator="",  # BartForConditionalGeneration folder with its tokenizer
    )
    c.rag = dict(
        variant="token",  # token | sequence | closed_book
        k=5,  # documents per question in training
        max_combined_length=300,  # context tokens (title / text // question)
        prefix="",
    )
    c.train = dict(
        steps=1000,
        batch_size=8,  # global batch (split over processes and the data axis)
        learning_rate=3e-5,
        warmup_steps=500,
        weight_decay=0.001,
        clip_norm=0.1,
        epsilon=0.1,  # label smoothing
        form=objective.TRAINING_FORM,
        loss_reduction="mean",
        freeze_query_encoder=False,
        query_encoder_learning_rate=ml_collections.config_dict.placeholder(float),  # None: learning_rate
        compute_dtype="float32",
        remat=False,
        grad_accum_steps=1,
        retrieval_refresh_every=1,  # steps between refreshes of the question encoder used for retrieval
        on_nonfinite="stop",  # stop | skip
        log_every=10,
        eval_every=500,
        save_every=500,
        keep_checkpoints=3,
        best_metric="em",  # an eval metric, or "" for none
    )
    c.eval = dict(
        k=5,  # documents per question at test time
        num_beams=1,
        max_length=16,
        decoding="thorough",  # RAG-Sequence: thorough | fast
        batch_size=32,
        max_examples=0,  # 0 = all
    )
    c.mesh = dict(data=-1, fsdp=1, model=1)
    return c


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """``spec`` is ``path.py`` or ``path.py:arg``; ``overrides`` are ``--config.a.b=value`` (or
    ``config.a.b=value``) strings."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"rag_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} defines no get_config(arg)")
    config = module.get_config(arg) if arg else module.get_config()
    for override in overrides:
        apply_override(config, override)
    return config


def with_changes(config: ml_collections.ConfigDict, **sections) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``sections`` applied: a dict updates that section
    (``train={"steps": 300}``), any other value sets a top-level field (``seed=1``)."""
    config = copy.deepcopy(config)
    for name, value in sections.items():
        if isinstance(value, dict):
            config[name].update(value)
        else:
            config[name] = value
    return config


def saved_run_config(run_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """The resolved config a run saved next to its checkpoints (over ``default_config``, so fields
    added since the run take their defaults), with ``overrides`` applied."""
    config = default_config()
    config.update(read_run_config(os.path.join(run_dir, "checkpoints", "config.json")))
    for override in overrides:
        apply_override(config, override)
    return config


def read_run_config(path: str | os.PathLike) -> dict:
    """A run config saved as JSON (``Checkpointer.write_config``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no run config at {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(config, dict):
        raise TypeError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    key, sep, raw = override.removeprefix("--").partition("=")
    if not sep or not key.startswith("config."):
        raise ValueError(f"override {override!r}: expected --config.<field>=<value>")
    *parents, leaf = key.removeprefix("config.").split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node:
            raise KeyError(f"override {override!r}: no field {'.'.join(parents[: i + 1])!r} in the config")
        node = node[name]
    if leaf not in node:
        raise KeyError(f"override {override!r}: no field {key.removeprefix('config.')!r} in the config")
    node[leaf] = _parse_like(raw, node[leaf], override)


def _parse_like(raw: str, current, where: str):
    if isinstance(current, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"override {where!r}: expected a boolean")
    if isinstance(current, (int, float)):
        try:
            return type(current)(float(raw)) if isinstance(current, int) and "." not in raw else type(current)(raw)
        except ValueError:
            raise ValueError(f"override {where!r}: expected {type(current).__name__}") from None
    if isinstance(current, str):
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
