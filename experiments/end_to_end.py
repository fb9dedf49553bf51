"""End-to-end retriever training (issue 18) on a task the pretrained retriever cannot solve.

The task is the quickstart's knowledge base with every last name written in the passages as a code
word (``generate_kb(aliases=True)``; questions keep the real names): pretrained MiniLM finds the
answer in its top 5 for about a fifth of the test questions (0.98 on the plain task). Five runs from
the same generator (pretrained on the passages, then warmed up as a reader by ``--reader-warmup-steps``
RAG steps on the plain knowledge base, ``warm_reader``), seeds and steps:

* frozen retriever (both encoders frozen: the paper's "Frozen"),
* query-side only (the question encoder trained, the document encoder and index frozen: the paper),
* end-to-end, full re-index (both trained; the corpus re-embedded and re-indexed in the background
  every ``--reindex-every`` steps, swapped in ``--reindex-lag`` steps later: REALM / rag-end2end),
* end-to-end, re-rank (both trained; the stale index proposes ``4 k`` candidates, the step keeps the
  ``k`` the current encoders score highest: Atlas's re-rank),
* end-to-end, stale index (both trained, the index never refreshed: REALM's ablation).

Each is measured the same way: answer recall@k on the test questions before and after training
(after: with the trained question encoder over the corpus re-embedded with the trained document
encoder, the model a user deploys), test EM with that corpus, training steps/s and the share of the
training wall-clock spent building index generations (background) and waiting for them.

    python experiments/end_to_end.py --out experiments/results/end_to_end

``end_to_end_table`` is also the ``end_to_end`` ablation of ``experiments/ablations.py`` (on its runs'
task).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

from rag_jax.config import with_changes
from rag_jax.hf.generator import save_generator_hf
from rag_jax.models.configs import BartConfig
from rag_jax.quickstart.pipeline import (
    answer_recall,
    every_example,
    pretrain_generator,
    quickstart_config,
    variant_config,
)
from rag_jax.quickstart.task import prepare_task
from rag_jax.retrieval import IndexGenerations, PassageStore, build_generation, snapshot_encode_fn
from rag_jax.training import components, evaluate, loop
from rag_jax.training.metric_writer import read_metrics


def settings(steps: int, k: int, reindex_every: int, reindex_lag: int) -> dict[str, dict]:
    """The five runs' config changes (see the module docstring)."""
    e2e = {"freeze_query_encoder": False, "doc_encoder": "trained"}
    return {
        "frozen retriever": {"train": {"freeze_query_encoder": True}},
        "query-side only": {"train": {"freeze_query_encoder": False}},
        "end-to-end, full re-index": {"train": {**e2e, "index_refresh": "full", "reindex_every": reindex_every,
                                                "reindex_lag": reindex_lag}},  # fmt: skip
        "end-to-end, re-rank": {"train": {**e2e, "index_refresh": "rerank", "rerank_candidates": 4 * k}},
        "end-to-end, stale index": {"train": {**e2e, "index_refresh": "none"}},
    }


def _deployed_retriever(cfg, model, retriever, out: str):
    """``retriever`` over the corpus re-embedded with the model's trained document encoder (exact index),
    or itself when the document encoder was frozen."""
    if model.doc_encoder is None:
        return retriever
    inputs = components.doc_inputs(cfg)
    index, embeddings = build_generation(
        IndexGenerations(out), cfg.train.steps, retriever.store,
        snapshot_encode_fn(model.doc_encoder, model.doc_encoder.params), inputs.tokenize, index_kind="exact",
        batch_size=cfg.train.reindex_batch_size, shard_size=1 << 16, input_mode=inputs.input_mode,
    )  # fmt: skip
    return retriever.with_corpus(retriever.store, index, embeddings)


def warm_reader(qc, paths, out: str, steps: int) -> str:
    """Teach the generator to read before the five runs: ``steps`` RAG-Token steps (retriever frozen) on the
    plain knowledge base with the same people, where the pretrained retriever finds the answer (recall@5 0.98),
    starting from the aliased task's pretrained generator (whose tokenizer knows the code words). Returns the
    folder of the warmed generator. Without it the generator never learns to read on the aliased task (the
    answer is among its k passages for a fifth of the questions), so p(y|x,z) is flat over z and the retrieval
    gradient is noise (experiments/RESULTS.md)."""
    folder = os.path.join(out, "generator")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    plain = prepare_task(os.path.join(out, "plain_task"), entities=qc.task.entities, generator=BartConfig(**qc.task.generator), seed=qc.run.seed,
                         encoder=qc.task.encoder, index="exact", embed_max_length=qc.task.embed_max_length)  # fmt: skip
    plain = dataclasses.replace(plain, generator=paths.generator)
    cfg = with_changes(variant_config(plain, "token", os.path.join(out, "run"), qc),
                       train={"steps": steps, "freeze_query_encoder": True, "save_every": steps,
                              "eval_every": steps, "log_every": max(1, steps // 50)})  # fmt: skip
    loop.train(cfg)
    model, _ = evaluate.load_trained_model(cfg)
    save_generator_hf(model.generator, folder)
    return folder


def end_to_end_table(base_cfg, out: str, *, steps: int, retriever_learning_rate: float, reindex_every: int,
                     reindex_lag: int, max_examples: int = 0) -> tuple[dict, str]:  # fmt: skip
    """Train and measure the five settings from ``base_cfg`` (a RAG run config) on its first ``max_examples``
    test questions (0: all); returns (results, markdown). Runs go to ``out/runs/<n>``; a re-run resumes or
    reuses them."""
    k = base_cfg.rag.k
    base = with_changes(base_cfg, train={"steps": steps, "query_encoder_learning_rate": retriever_learning_rate,
                                         "doc_encoder_learning_rate": retriever_learning_rate,
                                         "save_every": steps, "eval_every": steps,
                                         "log_every": max(1, steps // 50)},
                        eval={"k": k})  # fmt: skip
    question_tokenizer, generator_tokenizer = components.tokenizers(base)
    initial = components.build_model(base)
    retriever = components.build_retriever(base, initial, question_tokenizer, generator_tokenizer, k=k)
    test = components.read_split(base, "test")[: max_examples or None]
    recall_before = answer_recall(retriever, initial.question_encoder.params, test, k, batch_size=100)
    results = {}
    for i, (name, changes) in enumerate(settings(steps, k, reindex_every, reindex_lag).items()):
        run_dir = os.path.join(out, "runs", f"end_to_end-{i}")
        cfg = with_changes(base, run_dir=run_dir, **changes)
        start = time.perf_counter()
        loop.train(cfg)
        train_s = time.perf_counter() - start
        logged = [r for r in read_metrics(run_dir) if "train/loss" in r][-1]
        model, _ = evaluate.load_trained_model(cfg)
        deployed = _deployed_retriever(cfg, model, retriever, os.path.join(run_dir, "deployed_index"))
        metrics, _ = evaluate.evaluate(every_example(cfg), model, test, generator_tokenizer=generator_tokenizer,
                                       retriever=deployed, progress=False,
                                       doc_inputs=components.doc_inputs(cfg) if model.doc_encoder else None)  # fmt: skip
        results[name] = {
            "recall_before": recall_before,
            "recall_after": answer_recall(deployed, model.question_encoder.params, test, k, batch_size=100),
            "em": metrics["em"], "f1": metrics["f1"], "train_s": train_s, "steps_per_s": steps / train_s,
            "reindex_build_share": logged.get("train/reindex_build_s", 0.0) / train_s,
            "reindex_wait_share": logged.get("train/reindex_wait_s", 0.0) / train_s,
        }  # fmt: skip
        print(f"end_to_end: {name}: " + ", ".join(f"{key} {v:.3f}" for key, v in results[name].items()), flush=True)
    lines = [f"| retriever training ({steps} steps) | answer recall@{k} before | after | test EM | steps/s | "
             "re-index build share (background) | waiting share |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        lines.append(f"| {name} | {r['recall_before']:.3f} | {r['recall_after']:.3f} | {r['em']:.3f} | "
                     f"{r['steps_per_s']:.2f} | {r['reindex_build_share']:.1%} | {r['reindex_wait_share']:.1%} |")  # fmt: skip
    plot(os.path.join(out, "end_to_end.png"), results, k)
    return results, "\n".join(lines) + "\n\n![end-to-end retriever training](end_to_end.png)\n"


def plot(path: str, results: dict, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = list(results)
    for ax, (title, keys) in zip(axes, ((f"answer recall@{k} (test)", ("recall_before", "recall_after")),
                                        ("test exact match", ("em",)))):  # fmt: skip
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            ax.bar([i + j * width for i in range(len(names))], [results[n][key] for n in names], width,
                   label=key.replace("_", " "))  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=15, ha="right")
        ax.set(title=title, ylim=(0, 1))
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--entities", type=int, default=1000)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--retriever-learning-rate", type=float, default=1e-4, help="both encoders' peak learning rate")
    p.add_argument("--reindex-every", type=int, default=30)
    p.add_argument("--reindex-lag", type=int, default=5)
    p.add_argument("--pretrain-steps", type=int, default=0, help="generator pretraining (0: the quickstart's)")
    p.add_argument("--reader-warmup-steps", type=int, default=150,
                   help="RAG steps on the plain knowledge base before the five runs (warm_reader; 0: none)")
    args = p.parse_args(argv)
    qc = quickstart_config()
    qc.task.entities = args.entities
    qc.task.index = "exact"
    if args.pretrain_steps:
        qc.task.pretrain_steps = args.pretrain_steps
    start = time.perf_counter()
    paths = prepare_task(os.path.join(args.out, "task"), entities=args.entities, generator=BartConfig(**qc.task.generator),
                         seed=qc.run.seed, encoder=qc.task.encoder, index="exact",
                         embed_max_length=qc.task.embed_max_length, aliases=True)  # fmt: skip
    paths = dataclasses.replace(paths, generator=pretrain_generator(paths, os.path.join(args.out, "pretrain"), qc))
    if args.reader_warmup_steps:
        paths = dataclasses.replace(paths, generator=warm_reader(qc, paths, os.path.join(args.out, "reader_warmup"),
                                                                 args.reader_warmup_steps))  # fmt: skip
    base = variant_config(paths, "token", os.path.join(args.out, "runs", "base"), qc)
    with PassageStore.open(paths.passages) as store:
        passages = len(store)
    results, table = end_to_end_table(base, args.out, steps=args.steps,
                                      retriever_learning_rate=args.retriever_learning_rate,
                                      reindex_every=args.reindex_every, reindex_lag=args.reindex_lag)  # fmt: skip
    command = "python " + " ".join(sys.argv) if argv is None else f"end_to_end.main({argv!r})"
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)"
    header = (f"# End-to-end retriever training\n\nCommand: `{command}`. Machine: {machine}. Task: aliased knowledge "
              f"base, {args.entities} people, {passages} passages; encoder {paths.encoder_label}; generator "
              f"pretrained on the passages, then {args.reader_warmup_steps} RAG steps on the plain knowledge base; "
              f"{time.perf_counter() - start:.0f} s in all.\n\n")  # fmt: skip
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "end_to_end.md"), "w") as f:
        f.write(header + table)
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
