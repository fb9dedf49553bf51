"""Run configs: the one schema (``default_config``), config files and overrides, and the typed views
the library takes (``resolve``).

A config file is a Python file with ``get_config(arg)`` returning an ``ml_collections.ConfigDict``
(``--config experiments/configs/paper.py:nq-token``), with command-line overrides
(``--config.rag.k=10``). ``default_config()`` is the schema: every field a run reads, with its
default, defined nowhere else. A config file starts from it and changes what its experiment needs;
every field it sets and every override must exist in the schema (a typo is an error naming the
closest valid field), and an override is parsed by the type of the field's current value.

``resolve(config)`` checks the values and builds the typed, frozen views the library's APIs take
(``TrainConfig`` with its ``OptimizerConfig``, ``MeshConfig``, the model's ``RagConfig``); no other
place constructs them from a config, and they have no defaults of their own.

Defaults decided once (they disagreed before the views were derived from the schema): label smoothing
``train.epsilon = 0.1`` and weight decay 0.001, clip 0.1, warmup 500 (the fine-tuning recipe used
with the transformers reference, design.md); the learning-rate schedule decays to 0 at
``train.steps`` (default 1000); the loss is a per-example mean (``train.loss_reduction``: the learning
rate does not depend on the batch size) in the training form of the objective
(``rag_jax.rag.objective``); ``reference_recipe()`` switches to the reference's batch sum.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import importlib.util
import json
import os
from pathlib import Path
from typing import Literal

import ml_collections

from rag_jax.errors import ConfigError
from rag_jax.models.configs import RagConfig
from rag_jax.models.remat import REMAT_POLICIES
from rag_jax.rag import objective

VARIANTS = ("token", "sequence", "closed_book")
RETRIEVERS = ("dense", "device", "bm25")
COMPUTE_DTYPES = ("float32", "bfloat16")
DOC_ENCODER_MODES = ("frozen", "trained")
INDEX_REFRESHES = ("none", "full", "rerank")


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
        labels="",  # comma-separated: keep only examples whose answer is one of these (FEVER-2:
        # "SUPPORTS,REFUTES", the 3-way file without NOT ENOUGH INFO); "" = every example
    )
    c.corpus = dict(
        passages="",  # DPR tsv or JSONL passages
        embeddings="",  # `rag-jax embed` output directory
        index="",  # `rag-jax build-index` output directory
        retriever="dense",  # dense (q . d over the index) | bm25 (built in memory from the passages; the
        # question encoder is frozen and the BM25 scores are the retrieval logits)
        # | device (exact q . d inside the jitted step, the embeddings and the passages' tokens split over the mesh's
        # devices: rag_jax.retrieval.device; needs passages and embeddings, no index)
        device_dtype="float32",  # device: the embeddings' storage on the devices, float32 | bfloat16 (half the memory)
    )
    c.model = dict(
        rag="",  # a transformers RAG folder; or the two parts below
        question_encoder="",  # DPR question encoder / BERT / sentence-transformers folder
        generator="",  # BartForConditionalGeneration folder with its tokenizer
        # the document encoder trained with train.doc_encoder=trained: a DPR context encoder / BERT /
        # sentence-transformers folder with its tokenizer; "" = the encoder that embedded corpus.embeddings
        doc_encoder="",
        share_encoders=False,  # one encoder for questions and documents (Contriever-style; needs doc_encoder=trained)
        doc_max_length=256,  # document tokens when the step or a re-index encodes passages (`rag-jax embed`'s default)
    )
    c.rag = dict(
        variant="token",  # token | sequence | closed_book
        k=5,  # documents per question in training
        max_combined_length=300,  # context tokens (title / text // question)
        prefix="",
        # doc_scores = score_scale * q(x) . d(z); None: automatic (1, or 20 = 1 / Contriever's temperature 0.05
        # for a question encoder that L2-normalises its vectors: rag_jax.rag.model.automatic_score_scale)
        score_scale=ml_collections.config_dict.placeholder(float),
        learn_score_scale=False,  # train log(score_scale) from the scale above (dense retrieval only)
    )
    c.train = dict(
        steps=1000,
        batch_size=8,  # global batch (split over processes and the data axis)
        learning_rate=3e-5,
        warmup_steps=500,
        end_learning_rate=0.0,  # the learning rate reached at `steps` (polynomial decay from the peak)
        decay_power=1.0,  # 1.0: linear decay
        weight_decay=0.001,  # decoupled (AdamW), matrices only
        clip_norm=0.1,  # global gradient norm; 0: no clipping
        adam_b1=0.9,
        adam_b2=0.999,
        adam_eps=1e-8,
        epsilon=0.1,  # label smoothing
        exclude_bos_score=False,  # RAG-Sequence: drop a BOS first target from the likelihood (transformers' flag)
        form=objective.TRAINING_FORM,  # "paper" (training form) | "hf" (transformers' exact loss): rag_jax.rag.objective
        loss_reduction="mean",  # mean | sum (over the batch)
        freeze_query_encoder=False,
        query_encoder_learning_rate=ml_collections.config_dict.placeholder(float),  # None: learning_rate
        score_scale_learning_rate=ml_collections.config_dict.placeholder(float),  # None: learning_rate
        compute_dtype="float32",  # float32 | bfloat16 (matmuls; master weights stay float32)
        # rematerialisation of each scanned layer: none | full | dots_saveable | dots_with_no_batch_dims_saveable
        # (rag_jax.models.remat); True / False, from configs written when it was a flag, mean full / none
        remat=ml_collections.FieldReference("none", field_type=object),
        grad_accum_steps=1,
        # steps between refreshes of the question encoder host retrieval uses (its next R steps are retrieved in the
        # background with it). 16: the paper's step on v5e-8 waits <= ~5% for host retrieval (experiments/RESULTS.md,
        # "Host retrieval against the train step"); 1: the current encoder, retrieval serial with every step
        retrieval_refresh_every=16,
        # end-to-end retriever training (rag_jax.training.reindex): frozen (the paper) | trained (the step re-encodes
        # the retrieved passages, so the loss's gradient reaches the document encoder)
        doc_encoder="frozen",
        doc_encoder_learning_rate=ml_collections.config_dict.placeholder(float),  # None: learning_rate
        # none (the stale index throughout) | full (re-embed the corpus and rebuild the index in the background every
        # reindex_every steps, swapped in reindex_lag steps later) | rerank (retrieve rerank_candidates passages from
        # the stale index, keep the rag.k the current encoders score highest, inside the step)
        index_refresh="none",
        reindex_every=500,
        reindex_lag=50,
        reindex_batch_size=128,  # passages per embedding batch of a re-index
        rerank_candidates=20,
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
        answer_match="string",  # string (SQuAD-normalised EM / F1) | regex (answers are patterns: CuratedTrec)
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
    check_fields(config, where=path)
    for override in overrides:
        apply_override(config, override)
    return config


class UnknownFieldError(KeyError):
    """A config names a field the schema (``default_config``) does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _unknown_field(field: str, known: list[str], where: str) -> UnknownFieldError:
    close = difflib.get_close_matches(field, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UnknownFieldError(f"{where}: no field {field!r} in the config{hint}")


def _field_paths(config, prefix: str = "") -> list[str]:
    paths = []
    for name, value in config.items():
        path = f"{prefix}{name}"
        paths += _field_paths(value, path + ".") if isinstance(value, (dict, ml_collections.ConfigDict)) else [path]
    return paths


def check_fields(config: ml_collections.ConfigDict, *, where: str) -> None:
    """Every field ``config`` sets must exist in ``default_config()``; the first that does not is an
    ``UnknownFieldError`` naming it, ``where`` it was set and the closest valid field."""
    known = _field_paths(default_config())
    for field in _field_paths(config):
        if field not in known:
            raise _unknown_field(field, known, where)


def with_changes(config: ml_collections.ConfigDict, **sections) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``sections`` applied: a dict updates that section
    (``train={"steps": 300}``), any other value sets a top-level field (``seed=1``)."""
    check_fields(ml_collections.ConfigDict(sections), where="with_changes")
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
    saved = read_run_config(os.path.join(run_dir, "checkpoints", "config.json"))
    config.update(saved)
    if "score_scale" not in saved.get("rag", {}):  # saved before the scale existed: its runs scored q . d
        config.rag.score_scale = 1.0
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
    field = key.removeprefix("config.")
    *parents, leaf = field.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise _unknown_field(".".join(parents[: i + 1]), _field_paths(config), f"override {override!r}")
        node = node[name]
    if leaf not in node:
        raise _unknown_field(field, _field_paths(config), f"override {override!r}")
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


def reference_recipe() -> ml_collections.ConfigDict:
    """``default_config()`` with the transformers reference's batch-summed loss: with the defaults' lr
    3e-5, label smoothing 0.1, weight decay 0.001, clip 0.1 and warmup 500, the recipe used with
    ``Rag{Token,Sequence}ForGeneration`` (design.md)."""
    return with_changes(default_config(), train={"loss_reduction": "sum"})


# -- typed views ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then polynomial decay, global-norm clipping (None: none)."""

    learning_rate: float
    warmup_steps: int
    total_steps: int
    end_learning_rate: float
    decay_power: float
    weight_decay: float
    clip_norm: float | None
    b1: float
    b2: float
    eps: float


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What the train step computes (see the ``train`` fields of ``default_config``)."""

    variant: Literal["token", "sequence", "closed_book"]
    epsilon: float
    exclude_bos_score: bool
    form: objective.Form
    loss_reduction: Literal["mean", "sum"]
    freeze_query_encoder: bool
    query_encoder_learning_rate: float | None  # None: the optimizer's learning rate
    learn_score_scale: bool  # params["score_scale"] = log(scale), its own optimizer group "score_scale"
    score_scale_learning_rate: float | None  # None: the optimizer's learning rate
    train_doc_encoder: bool  # the step re-encodes the retrieved passages with a trained document encoder
    share_encoders: bool  # ... which is the question encoder (params["query_encoder"] encodes both sides)
    doc_encoder_learning_rate: float | None  # None: the optimizer's learning rate
    index_refresh: Literal["none", "full", "rerank"]
    rerank_top_k: int | None  # rerank: the documents the step keeps of the batch's candidates (rag.k); else None
    compute_dtype: Literal["float32", "bfloat16"]
    remat: str  # a policy of rag_jax.models.remat.REMAT_POLICIES
    grad_accum_steps: int
    skip_nonfinite: bool
    optimizer: OptimizerConfig
    seed: int
    device_retrieval_k: int | None = None  # corpus.retriever=device: the documents the step retrieves (rag.k); else None


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape over the axes (data, fsdp, model); -1 on one axis means "all remaining devices"."""

    data: int
    fsdp: int
    model: int


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The typed views of one run config."""

    train: TrainConfig
    mesh: MeshConfig
    rag: RagConfig  # the model's RAG settings when it is built from a question encoder + a generator
    score_scale: float | None  # the retrieval score scale (the initial one when learned); None: automatic


def _check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"must be one of {', '.join(map(repr, choices))}; got {value!r}", what=f"config.{field}")


_REMAT_FLAGS = {"true": "full", "1": "full", "yes": "full", "false": "none", "0": "none", "no": "none"}


def _remat_policy(value) -> str:
    """``train.remat`` as a policy name: a boolean (the field was a flag before the policies, in a config
    file or as an override's text) is ``"full"`` or ``"none"``; an unknown name is a ``ConfigError``."""
    policy = _REMAT_FLAGS.get(str(value).lower(), value)
    _check_choice("train.remat", policy, REMAT_POLICIES)
    return policy


def dense_rag(config: ml_collections.ConfigDict) -> bool:
    """Whether the run scores documents densely, ``score_scale * q(x) . d(z)`` (not closed-book, not BM25)."""
    return config.rag.variant != "closed_book" and config.corpus.retriever in ("dense", "device")


def device_retrieval(config: ml_collections.ConfigDict) -> bool:
    """Whether the step retrieves on the devices (``corpus.retriever=device``, not closed-book)."""
    return config.rag.variant != "closed_book" and config.corpus.retriever == "device"


def _check_end_to_end(config: ml_collections.ConfigDict) -> None:
    """The end-to-end retriever settings agree: a trained document encoder needs dense retrieval; a
    shared encoder is a trained one (and a trained question encoder); refreshing the index needs a
    document encoder that changes; rerank retrieves more candidates than it keeps."""
    t, trained = config.train, config.train.doc_encoder == "trained"
    if trained and not dense_rag(config):
        raise ConfigError("trained needs dense retrieval (rag.variant token or sequence, corpus.retriever=dense)",
                          what="config.train.doc_encoder")  # fmt: skip
    if trained and config.corpus.retriever == "device":
        raise ConfigError("trained re-encodes the retrieved passages on the host's batches: use corpus.retriever=dense "
                          "(device retrieval scores the stored embeddings)", what="config.train.doc_encoder")  # fmt: skip
    if config.model.share_encoders and not trained:
        raise ConfigError("one encoder for both sides is trained with the question encoder: set "
                          "train.doc_encoder=trained", what="config.model.share_encoders")  # fmt: skip
    if config.model.share_encoders and t.freeze_query_encoder:
        raise ConfigError("a shared encoder is the question encoder, which train.freeze_query_encoder freezes",
                          what="config.model.share_encoders")  # fmt: skip
    if t.index_refresh != "none" and not trained:
        raise ConfigError(f"{t.index_refresh!r} re-embeds passages with a document encoder that changes: set "
                          "train.doc_encoder=trained (or index_refresh=none)", what="config.train.index_refresh")  # fmt: skip
    if t.index_refresh == "full" and not 0 <= t.reindex_lag < t.reindex_every:
        raise ConfigError(f"must be in [0, train.reindex_every) (one index built at a time), got {t.reindex_lag} with "
                          f"reindex_every {t.reindex_every}", what="config.train.reindex_lag")  # fmt: skip
    if t.index_refresh == "rerank" and t.rerank_candidates <= config.rag.k:
        raise ConfigError(f"must exceed rag.k={config.rag.k} (the documents kept), got {t.rerank_candidates}",
                          what="config.train.rerank_candidates")  # fmt: skip
    if config.model.doc_max_length < 2:
        raise ConfigError(f"must be >= 2 tokens, got {config.model.doc_max_length}", what="config.model.doc_max_length")


def resolve(config: ml_collections.ConfigDict) -> RunSettings:
    """The typed views of ``config`` (values checked; a BM25 retriever freezes the question encoder:
    its scores do not depend on it, and keeps its own score scale: ``rag.learn_score_scale`` applies to
    dense retrieval only)."""
    for field, choices in (("rag.variant", VARIANTS), ("corpus.retriever", RETRIEVERS), ("train.form", objective.FORMS),
                           ("train.loss_reduction", ("mean", "sum")), ("train.compute_dtype", COMPUTE_DTYPES),
                           ("train.on_nonfinite", ("stop", "skip")), ("eval.answer_match", ("string", "regex")),
                           ("train.doc_encoder", DOC_ENCODER_MODES), ("train.index_refresh", INDEX_REFRESHES),
                           ("corpus.device_dtype", ("float32", "bfloat16"))):  # fmt: skip
        section, name = field.split(".")
        _check_choice(field, config[section][name], choices)
    t = config.train
    if t.grad_accum_steps < 1:
        raise ConfigError(f"must be >= 1, got {t.grad_accum_steps}", what="config.train.grad_accum_steps")
    if config.rag.score_scale is not None and not config.rag.score_scale > 0:
        raise ConfigError(f"must be positive (or None: automatic), got {config.rag.score_scale}",
                          what="config.rag.score_scale")
    _check_end_to_end(config)
    optimizer = OptimizerConfig(
        learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, total_steps=t.steps,
        end_learning_rate=t.end_learning_rate, decay_power=t.decay_power, weight_decay=t.weight_decay,
        clip_norm=t.clip_norm or None, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
    )  # fmt: skip
    train = TrainConfig(
        variant=config.rag.variant, epsilon=t.epsilon, exclude_bos_score=t.exclude_bos_score, form=t.form,
        loss_reduction=t.loss_reduction,
        freeze_query_encoder=t.freeze_query_encoder or config.corpus.retriever == "bm25",
        query_encoder_learning_rate=t.query_encoder_learning_rate,
        learn_score_scale=config.rag.learn_score_scale and dense_rag(config), score_scale_learning_rate=t.score_scale_learning_rate,
        train_doc_encoder=t.doc_encoder == "trained", share_encoders=config.model.share_encoders,
        doc_encoder_learning_rate=t.doc_encoder_learning_rate, index_refresh=t.index_refresh,
        rerank_top_k=config.rag.k if t.index_refresh == "rerank" else None,
        compute_dtype=t.compute_dtype, remat=_remat_policy(t.remat),
        grad_accum_steps=t.grad_accum_steps, skip_nonfinite=t.on_nonfinite == "skip", optimizer=optimizer,
        seed=config.seed, device_retrieval_k=config.rag.k if device_retrieval(config) else None,
    )  # fmt: skip
    rag = RagConfig(n_docs=config.rag.k, max_combined_length=config.rag.max_combined_length,
                    prefix=config.rag.prefix or None)  # fmt: skip
    return RunSettings(train=train, mesh=MeshConfig(**config.mesh.to_dict()), rag=rag, score_scale=config.rag.score_scale)
