"""``rag-jax quickstart``: closed-book BART vs RAG-Sequence vs RAG-Token on the synthetic task
(``rag_jax.quickstart.task``), with the same loop as ``rag-jax train``; then an index hot-swap of edited
facts into the trained RAG-Token model. ``run`` returns the results, ``rag_jax.quickstart.report`` shows
them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import ml_collections

from rag_jax.config import default_config, with_changes
from rag_jax.data import qa as data
from rag_jax.models.configs import BartConfig
from rag_jax.quickstart import knowledge_base
from rag_jax.quickstart.report import LABELS, VARIANTS, plot_training_curves, results_markdown
from rag_jax.quickstart.task import TaskPaths, build_corpus, prepare_task, run_config
from rag_jax.retrieval import PassageStore, load_embeddings, load_index, read_passages, write_passages_tsv
from rag_jax.training import components, evaluate, loop, metrics
from rag_jax.training.export import export_run
from rag_jax.training.metrics import has_answer

log = logging.getLogger(__name__)


def quickstart_config(small: bool = False) -> ml_collections.ConfigDict:
    """The quickstart's settings: ``task`` (the knowledge base, the encoder and index, generator
    pretraining, evaluation sizes: the quickstart's own fields) and ``run``, the run config every model
    trains with (``default_config`` with the quickstart's sizes; ``run.seed`` seeds everything).
    ``small`` is the test's few-minute version: fewer people and steps, the query encoder frozen.

    The generator is first pretrained on the corpus as an autoencoder (input ``title / text``, target
    the passage's first ``task.pretrain_target_length`` tokens; BART's denoising objective without the
    noise) for ``task.pretrain_steps``; all three models start from it. A randomly initialised generator
    does not discover copying an answer out of a retrieved passage within a CPU budget; one that has
    learned to reproduce passages does within ~50 RAG steps (experiments/RESULTS.md, quickstart)."""
    c = ml_collections.ConfigDict()
    c.task = dict(
        entities=1000,
        generator=dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=32,
                       dropout=0.0, init_std=0.1),  # BartConfig fields; vocab_size comes from the tokenizer
        encoder="minilm",  # the offline pretrained MiniLM (a random encoder when it is absent), or a folder
        index="scann",
        embed_max_length=32,
        pretrain_steps=300,
        pretrain_target_length=16,
        dev_examples=200,  # dev questions per evaluation during training
        dev_evaluations=3,  # during each training run (the last at its end)
        edit_fraction=0.5,  # hot-swap: the fraction of test people whose facts are edited
    )  # fmt: skip
    c.run = with_changes(
        default_config(),
        data={"max_question_length": 16, "max_source_length": 16, "max_target_length": 4},
        rag={"k": 5, "max_combined_length": 32},
        # retrieval with the current encoder every step: a few ms over 4,000 passages, and 16 stale steps would be a
        # tenth of these short runs
        train={"steps": 150, "batch_size": 32, "learning_rate": 1e-3, "query_encoder_learning_rate": 2e-5,
               "warmup_steps": 30, "weight_decay": 0.01, "clip_norm": 1.0, "epsilon": 0.0, "keep_checkpoints": 1,
               "retrieval_refresh_every": 1},
        eval={"batch_size": 100},
    )  # fmt: skip
    if small:
        c.task.update(entities=300, pretrain_steps=200, dev_examples=40, dev_evaluations=1)
        c.run.train.update(steps=100, query_encoder_learning_rate=None)
        c.run.eval.batch_size = 40
    return c


def variant_config(paths: TaskPaths, variant: str, run_dir: str,
                   qc: ml_collections.ConfigDict) -> ml_collections.ConfigDict:  # fmt: skip
    """The run config of one of the quickstart's models: ``qc.run`` on the task's files, with the
    logging, evaluation and checkpoint cadence the quickstart's sizes imply (the query encoder is frozen
    when it has no learning rate of its own; a trained document encoder reads the passages as they were
    embedded, ``task.embed_max_length`` tokens)."""
    run, steps = qc.run, qc.run.train.steps
    return run_config(
        paths, variant, run_dir, base=run, model={"doc_max_length": qc.task.embed_max_length},
        train={"freeze_query_encoder": run.train.query_encoder_learning_rate is None,
               "log_every": max(1, steps // 50), "eval_every": max(1, steps // qc.task.dev_evaluations),
               "save_every": steps},
        eval={"k": run.rag.k, "max_length": run.data.max_target_length + 2, "max_examples": qc.task.dev_examples},
    )  # fmt: skip


def every_example(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``cfg`` evaluating every example (``eval.max_examples`` limits the dev evaluations in training)."""
    return with_changes(cfg, eval={"max_examples": 0})


def pretrain_generator(paths: TaskPaths, out: str, qc: ml_collections.ConfigDict, *, progress: bool = True) -> str:
    """Train the initial generator to reproduce the corpus passages (``closed_book`` on
    ``{"input": "title / text", "target": its first tokens}``) with the training loop; returns the
    folder of the exported generator (the start of every model)."""
    from transformers import AutoTokenizer

    t = qc.run.train
    tokenizer = AutoTokenizer.from_pretrained(paths.generator)  # the task's word-level tokenizer (aliased: with codes)
    data_path = os.path.join(out, "pretrain.jsonl")
    os.makedirs(out, exist_ok=True)
    with open(data_path, "w") as f:
        for p in read_passages(paths.passages):
            text = f"{p.title} / {p.text}"
            target = " ".join(tokenizer.tokenize(text)[: qc.task.pretrain_target_length - 2])  # + <s> ... </s>
            f.write(json.dumps({"input": text, "target": target}) + "\n")
    cfg = run_config(
        paths, "closed_book", os.path.join(out, "run"), seed=qc.run.seed,
        data={"train": data_path, "dev": "", "test": "", "format": "generation",
              "max_source_length": qc.run.rag.max_combined_length,
              "max_target_length": qc.task.pretrain_target_length},
        train={"steps": qc.task.pretrain_steps, "batch_size": 2 * t.batch_size, "learning_rate": t.learning_rate,
               "warmup_steps": t.warmup_steps, "weight_decay": t.weight_decay, "clip_norm": 1.0, "epsilon": 0.0,
               "log_every": max(1, qc.task.pretrain_steps // 50), "save_every": qc.task.pretrain_steps,
               "keep_checkpoints": 1},
    )  # fmt: skip
    loop.train(cfg, progress=progress)
    folder = os.path.join(out, "generator")
    export_run(cfg, folder)
    return folder


def answer_recall(retriever, encoder_params, examples, k: int, batch_size: int) -> float:
    """The fraction of ``examples`` with a gold answer in the top ``k`` passages retrieved with the
    question encoder ``encoder_params``."""

    hits = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        found = retriever.retrieve([ex.question for ex in chunk], k=k, query_encoder_params=encoder_params)
        hits += [has_answer([p.text for p in ps], ex.answers) for ps, ex in zip(found.passages, chunk)]
    return float(sum(hits) / len(hits))


def _hot_swap(out: str, qc: ml_collections.ConfigDict, paths: TaskPaths, cfg, model, retriever, generator_tokenizer,
              progress: bool) -> dict:  # fmt: skip
    """Edit facts of test people in the corpus, re-embed, swap the index into the trained model's
    retriever (no retraining) and measure its answers to the edited questions against the old and
    the new facts, before and after the swap."""

    kb = knowledge_base.generate_kb(qc.task.entities, qc.run.seed)
    edit = knowledge_base.modify_facts(kb, qc.task.edit_fraction, qc.run.seed)
    edited_passages = os.path.join(out, "task", "kb_edited", "passages.tsv")
    os.makedirs(os.path.dirname(edited_passages), exist_ok=True)
    write_passages_tsv(edit.passages, edited_passages)
    embeddings, index = build_corpus(edited_passages, paths.encoder, os.path.join(out, "task", "corpus_edited"),
                                     index=qc.task.index, max_length=qc.task.embed_max_length,
                                     progress=progress)  # fmt: skip
    store = PassageStore.open(edited_passages)
    swapped = retriever.with_corpus(store, load_index(index), load_embeddings(embeddings, store=store))
    questions = [data.QAExample(q.question, q.answers, f"edited:{q.entity}/{q.attribute}") for q in edit.changed]
    result = {"questions": len(questions), "examples": []}
    for name, r in (("before", retriever), ("after", swapped)):
        _, records = evaluate.evaluate(cfg, model, questions, generator_tokenizer=generator_tokenizer, retriever=r,
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


def run(out: str, qc: ml_collections.ConfigDict | None = None, *, progress: bool = True) -> dict:
    """The whole quickstart into ``out``: task -> recall before -> train the three models -> test
    metrics -> HF export -> plot and tables -> hot-swap. Returns the measured results (also written
    to ``out/results.json`` and ``out/results.md``, the plot to ``out/training_curves.png``)."""
    import time

    qc = qc or quickstart_config()
    task, run_cfg = qc.task, qc.run
    start = time.perf_counter()

    def stage(text: str) -> None:
        print(f"\n== [{time.perf_counter() - start:6.0f} s] {text}", flush=True)

    stage("1/7 knowledge base -> encoder -> passage embeddings -> index")
    paths = prepare_task(os.path.join(out, "task"), entities=task.entities, generator=BartConfig(**task.generator),
                         seed=run_cfg.seed, encoder=task.encoder, index=task.index,
                         embed_max_length=task.embed_max_length, progress=progress)  # fmt: skip
    stage(f"2/7 pretrain the generator on the passages (autoencoder, {task.pretrain_steps} steps)")
    paths = dataclasses.replace(paths, generator=pretrain_generator(paths, os.path.join(out, "pretrain"), qc,
                                                                    progress=progress))  # fmt: skip
    with open(os.path.join(out, "task", "paths.json"), "w") as f:
        json.dump(dataclasses.asdict(paths), f, indent=2)  # for experiments/configs/quickstart.py
    configs = {v: variant_config(paths, v, os.path.join(out, "runs", v), qc) for v in VARIANTS}
    token_cfg = configs["token"]
    initial = components.build_model(token_cfg)
    question_tokenizer, generator_tokenizer = components.tokenizers(token_cfg)
    retriever = components.build_retriever(token_cfg, initial, question_tokenizer, generator_tokenizer, k=run_cfg.rag.k)
    test = components.read_split(token_cfg, "test")
    recall_before = answer_recall(retriever, initial.question_encoder.params, test, run_cfg.rag.k,
                                  run_cfg.eval.batch_size)
    print(f"answer recall@{run_cfg.rag.k} on test with the initial question encoder: {recall_before:.3f}")

    models, trained = {}, {}
    for i, variant in enumerate(VARIANTS):
        stage(f"{3 + i}/7 train {LABELS[variant]} ({run_cfg.train.steps} steps, batch {run_cfg.train.batch_size})")
        t0 = time.perf_counter()
        loop.train(configs[variant], progress=progress)
        train_s = time.perf_counter() - t0
        model, _ = evaluate.load_trained_model(configs[variant])
        metrics, _ = evaluate.evaluate(every_example(configs[variant]), model, test,
                                       generator_tokenizer=generator_tokenizer,
                                       retriever=None if variant == "closed_book" else retriever,
                                       progress=progress)  # fmt: skip
        models[variant], trained[variant] = {**metrics, "train_s": train_s}, model
        print(f"{LABELS[variant]}: test " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    stage("6/7 HF export, plot")
    export_dir = os.path.join(out, "export", "rag_token")
    export_run(token_cfg, export_dir, link_corpus=True)
    plot_training_curves(os.path.join(out, "training_curves.png"), {v: c.run_dir for v, c in configs.items()})

    stage("7/7 index hot-swap: edit facts, re-embed, swap the index, ask again")
    hot_swap = _hot_swap(out, qc, paths, every_example(token_cfg), trained["token"], retriever, generator_tokenizer,
                         progress)  # fmt: skip

    kb = knowledge_base.generate_kb(task.entities, run_cfg.seed)
    result = {
        "entities": task.entities, "passages": len(kb.passages),
        "test_people": sum(e.split == "test" for e in kb.entities), "test_questions": len(test), "encoder": paths.encoder_label, "k": run_cfg.rag.k, "recall_before": recall_before,
        "models": models, "hot_swap": hot_swap, "export": export_dir, "settings": qc.to_dict(),
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
