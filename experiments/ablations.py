"""The paper's ablations on trained RAG runs: each writes a markdown table and a plot.

Made for the quickstart's synthetic task (``rag-jax quickstart --out quickstart_out`` first: it
leaves the task, the trained RAG-Token and RAG-Sequence runs and ``results.json``); the same code
runs on any pair of ``rag-jax train`` runs (``--token-run``, ``--sequence-run``, e.g. NQ runs from
``experiments/configs/paper.py``), where the two training ablations cost two more training runs.

    python experiments/ablations.py --quickstart quickstart_out --out experiments/results/ablations

Ablations (``--only`` picks some; the defaults follow the paper's choices):

* ``k``: test-time documents k in {1, 5, 10, 20, 50} for the trained RAG-Token and RAG-Sequence
  models (the paper's Figure 3): EM, answer recall@k and the mean retrieval prior of the top
  document, p(z_1|x) = softmax(doc scores)_1 (how peaked retrieval is). RAG-Sequence decodes "fast"
  here (thorough decoding rescores every candidate against all k documents: k^2 generator passes
  per question).
* ``decoding``: RAG-Sequence thorough vs fast decoding, greedy and 4 beams, at the training k:
  EM and seconds for the test set.
* ``retriever``: BM25 (``corpus.retriever=bm25``: bm25s over title + text; the BM25 scores are the
  retrieval logits, the question encoder frozen; paper Table 6) vs dense: answer recall@k of BM25 and
  of the question encoder before and after RAG-Token training; the dense RAG-Token model answering
  with BM25 passages; a RAG-Token model trained with BM25 (same config otherwise).
* ``query_encoder``: RAG-Token trained with the question encoder frozen (the paper's "Frozen"
  retriever) vs trained (the given run): EM and recall@k.
* ``variant``: closed-book vs RAG-Sequence vs RAG-Token, and the index hot-swap: the quickstart's own
  measurements from ``results.json`` (``--quickstart`` only), repeated here so one file holds every
  ablation.
* ``score_scale``: the retrieval score scale ``doc_scores = scale * q . d`` (``rag.score_scale``) fixed
  at 1, fixed at 20, and learned from 1 (``rag.learn_score_scale``, its own learning rate 0.05):
  RAG-Token and RAG-Sequence trained with each (the given runs stand for the setting they were trained
  with; the others are trained like them), then the test-time k sweep of ``k`` for each: EM, answer
  recall@k and the mean p(top doc|x). With a cosine encoder (MiniLM) and scale 1, p(z|x) cannot
  concentrate and EM falls as k grows.
* ``end_to_end``: retriever training from the RAG-Token run's settings: frozen, query-side only, and
  end-to-end (the document encoder trained) with a full re-index, a re-rank and a stale index: answer
  recall@k before / after, test EM, steps/s and the re-index's share of the time
  (``experiments/end_to_end.py``, which also runs it on the aliased task it is made for).

Writes ``OUT/ablations.md`` (every table, with the command and machine), ``OUT/results.json``,
a plot per ablation (``OUT/*.png``); the training ablations' runs go to ``OUT/runs/`` (a re-run
resumes or reuses them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from rag_jax.config import resolve, saved_run_config, with_changes
from rag_jax.quickstart.pipeline import answer_recall
from rag_jax.quickstart.report import LABELS
from rag_jax.training import components, evaluate, loop
from rag_jax.training.metric_writer import read_metrics

ABLATIONS = ("variant", "k", "decoding", "retriever", "query_encoder", "score_scale", "end_to_end")
TEST_KS = (1, 5, 10, 20, 50)
SCORE_SCALES = {  # setting -> run config changes
    "fixed 1": {"rag": {"score_scale": 1.0, "learn_score_scale": False}},
    "fixed 20": {"rag": {"score_scale": 20.0, "learn_score_scale": False}},
    "learned from 1": {"rag": {"score_scale": 1.0, "learn_score_scale": True},
                       "train": {"score_scale_learning_rate": 0.05}},
}  # fmt: skip


class Runs:
    """The trained runs, their models and test questions, loaded once."""

    def __init__(self, token_run: str, sequence_run: str, split: str, max_examples: int):
        self.cfg = {"token": saved_run_config(token_run), "sequence": saved_run_config(sequence_run)}
        self.question_tokenizer, self.generator_tokenizer = components.tokenizers(self.cfg["token"])
        self.examples = components.read_split(self.cfg["token"], split)
        if max_examples:
            self.examples = self.examples[:max_examples]
        self._models = {}
        self._retrievers = {}
        self._k_rows = {}

    def model(self, variant: str):
        if variant not in self._models:
            self._models[variant] = evaluate.load_trained_model(self.cfg[variant])[0]
        return self._models[variant]

    def retriever(self, kind: str = "dense"):
        """One retriever per kind over the token run's corpus (the parameters of the question
        encoder are passed per call, so it serves every model)."""
        if kind not in self._retrievers:
            cfg = with_changes(self.cfg["token"], corpus={"retriever": kind})
            self._retrievers[kind] = components.build_retriever(cfg, self.model("token"), self.question_tokenizer,
                                                          self.generator_tokenizer, k=cfg.rag.k)  # fmt: skip
        return self._retrievers[kind]

    def evaluate(self, variant: str, model=None, retriever="dense", **eval_changes) -> dict:
        """Test metrics of ``model`` (default: the run's) with ``eval`` settings changed; every
        example counts (``max_examples`` of the runs' dev evaluation is lifted). ``seconds`` is the
        time of the whole set after one batch compiled the program."""
        cfg = with_changes(self.cfg[variant], eval={"max_examples": 0, **eval_changes})
        model = self.model(variant) if model is None else model

        def run(examples):
            return evaluate.evaluate(cfg, model, examples, generator_tokenizer=self.generator_tokenizer,
                                 retriever=self.retriever(retriever), progress=False)[0]  # fmt: skip

        run(self.examples[:1])
        start = time.perf_counter()
        metrics = run(self.examples)
        return {**metrics, "seconds": time.perf_counter() - start}

    def recall(self, k: int, encoder_params=None, retriever: str = "dense") -> float:
        return answer_recall(self.retriever(retriever), encoder_params, self.examples, k, batch_size=100)

    def top_prior(self, k: int, model) -> float:
        """The mean retrieval prior p(z|x) = softmax(doc scores) of the top document among k, with
        ``model``'s question encoder and score scale."""
        priors = []
        for start in range(0, len(self.examples), 100):
            chunk = self.examples[start : start + 100]
            found = self.retriever().retrieve([ex.question for ex in chunk], k=k, score_scale=model.score_scale,
                                              query_encoder_params=model.question_encoder.params)  # fmt: skip
            scores_BxK = found.doc_scores_BxK - found.doc_scores_BxK.max(axis=1, keepdims=True)
            priors += list(np.exp(scores_BxK[:, 0]) / np.exp(scores_BxK).sum(axis=1))
        return float(np.mean(priors))

    def k_row(self, variant: str, model, k: int) -> dict:
        """Test metrics of ``model`` with k documents (RAG-Sequence decoding "fast") and its mean
        p(top doc|x) (``top_prior``); computed once per (variant, model, k)."""
        key = (variant, id(model), k)
        if key not in self._k_rows:  # the model is kept with its rows, so its id is not reused
            row = {**self.evaluate(variant, model, k=k, decoding="fast"), "top_prior": self.top_prior(k, model)}
            self._k_rows[key] = (model, row)
            print(f"k: {LABELS[variant]} k={k}: EM {row['em']:.3f} recall@k {row['recall_at_k']:.3f} "
                  f"p(top doc) {row['top_prior']:.3f}", flush=True)  # fmt: skip
        return self._k_rows[key][1]


def train_run(base_cfg, run_dir: str, steps: int = 0, **sections):
    """Train (or resume / reuse) a run with ``base_cfg``'s settings changed (and ``steps`` training
    steps where given); returns its model and training seconds (0 when it was already trained)."""
    if steps:
        sections["train"] = {**sections.get("train", {}), "steps": steps}
    cfg = with_changes(base_cfg, run_dir=run_dir, **sections)
    trained = any(r["step"] >= cfg.train.steps and "train/loss" in r for r in read_metrics(run_dir))
    start = time.perf_counter()
    loop.train(cfg)
    return evaluate.load_trained_model(cfg)[0], 0.0 if trained else time.perf_counter() - start


# -- the ablations -------------------------------------------------------------------------------


def ablate_variant(runs: Runs, args) -> tuple[dict, str]:
    if not args.quickstart:
        return {}, "Model variants and the hot-swap come from the quickstart's results (`--quickstart`).\n"
    with open(os.path.join(args.quickstart, "results.json")) as f:
        quickstart = json.load(f)
    lines = ["| model | test EM | test F1 |", "|---|---|---|"]
    for variant, row in quickstart["models"].items():
        lines.append(f"| {LABELS[variant]} | {row['em']:.3f} | {row['f1']:.3f} |")
    swap = quickstart["hot_swap"]
    lines += ["", f"Index hot-swap ({swap['questions']} edited test facts, RAG-Token, no retraining):", "",
              "| index | EM vs old facts | EM vs new facts |", "|---|---|---|",
              f"| original | {swap['before_em_old_facts']:.3f} | {swap['before_em_new_facts']:.3f} |",
              f"| edited, swapped in | {swap['after_em_old_facts']:.3f} | {swap['after_em_new_facts']:.3f} |"]  # fmt: skip
    _plot_bars(os.path.join(args.out, "variant.png"), "test exact match",
               {"test EM": {LABELS[v]: row["em"] for v, row in quickstart["models"].items()},
                "hot-swap EM vs new facts": {"index before the swap": swap["before_em_new_facts"],
                                             "index after the swap": swap["after_em_new_facts"]}})  # fmt: skip
    lines += ["", "![variants and hot-swap](variant.png)"]
    return {"models": quickstart["models"], "hot_swap": swap}, "\n".join(lines) + "\n"


def ablate_k(runs: Runs, args) -> tuple[dict, str]:
    result = {f"{v}/{k}": runs.k_row(v, runs.model(v), k) for v in ("token", "sequence") for k in TEST_KS}
    header = "| test k | RAG-Token EM | RAG-Sequence EM (fast) | answer recall@k | p(top doc given x) | seconds (t / s) |"
    lines = [header, "|---|---|---|---|---|---|"]
    for k in TEST_KS:
        t, s = result[f"token/{k}"], result[f"sequence/{k}"]
        lines.append(f"| {k} | {t['em']:.3f} | {s['em']:.3f} | {t['recall_at_k']:.3f} | {t['top_prior']:.3f} | "
                     f"{t['seconds']:.0f} / {s['seconds']:.0f} |")  # fmt: skip
    _plot_k(os.path.join(args.out, "k.png"), result)
    return result, "\n".join(lines) + "\n\n![EM and recall against k](k.png)\n"


def ablate_decoding(runs: Runs, args) -> tuple[dict, str]:
    result = {}
    for decoding in ("thorough", "fast"):
        for beams in (1, 4):
            row = runs.evaluate("sequence", decoding=decoding, num_beams=beams)
            result[f"{decoding}/{beams}"] = row
            print(f"decoding: {decoding} beams={beams}: EM {row['em']:.3f} ({row['seconds']:.0f} s)", flush=True)
    lines = ["| RAG-Sequence decoding | beams | test EM | test F1 | seconds |", "|---|---|---|---|---|"]
    for name, row in result.items():
        decoding, beams = name.split("/")
        lines.append(f"| {decoding} | {beams} | {row['em']:.3f} | {row['f1']:.3f} | {row['seconds']:.1f} |")
    labels = {name: name.replace("/", ", beams ") for name in result}
    _plot_bars(os.path.join(args.out, "decoding.png"), "RAG-Sequence decoding",
               {"test EM": {labels[n]: r["em"] for n, r in result.items()},
                "seconds (test set)": {labels[n]: r["seconds"] for n, r in result.items()}})  # fmt: skip
    return result, "\n".join(lines) + "\n\n![decoding](decoding.png)\n"


def ablate_retriever(runs: Runs, args) -> tuple[dict, str]:
    initial = components.build_model(runs.cfg["token"]).question_encoder.params
    trained = runs.model("token").question_encoder.params
    recall = {
        "BM25": [runs.recall(k, retriever="bm25") for k in TEST_KS],
        "dense, initial question encoder": [runs.recall(k, initial) for k in TEST_KS],
        "dense, after RAG-Token training": [runs.recall(k, trained) for k in TEST_KS],
    }
    bm25_model, train_s = train_run(runs.cfg["token"], os.path.join(args.out, "runs", "token-bm25"),
                                    args.train_steps, corpus={"retriever": "bm25"})  # fmt: skip
    models = {
        "RAG-Token trained with dense, tested with dense": runs.evaluate("token"),
        "RAG-Token trained with dense, tested with BM25": runs.evaluate("token", retriever="bm25"),
        "RAG-Token trained with BM25, tested with BM25": runs.evaluate("token", bm25_model, retriever="bm25"),
    }
    lines = ["| retriever | " + " | ".join(f"recall@{k}" for k in TEST_KS) + " |", "|---" * (len(TEST_KS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{r:.3f}" for r in row) + " |" for name, row in recall.items()]
    lines += ["", f"| model (k = {runs.cfg['token'].eval.k}) | test EM | test F1 |", "|---|---|---|"]
    lines += [f"| {name} | {row['em']:.3f} | {row['f1']:.3f} |" for name, row in models.items()]
    lines += ["", f"BM25 training run: {train_s:.0f} s.", "", "![answer recall@k](recall.png)"]
    _plot_recall(os.path.join(args.out, "recall.png"), recall)
    return {"recall_at_k": recall, "models": models, "bm25_train_s": train_s}, "\n".join(lines) + "\n"


def ablate_query_encoder(runs: Runs, args) -> tuple[dict, str]:
    k = runs.cfg["token"].eval.k
    if runs.cfg["token"].train.freeze_query_encoder:
        return {}, "The RAG-Token run froze its question encoder: there is no trained one to compare with.\n"
    frozen_model, train_s = train_run(runs.cfg["token"], os.path.join(args.out, "runs", "token-frozen-qe"),
                                      args.train_steps, train={"freeze_query_encoder": True})  # fmt: skip
    rows = {}
    for name, model in (("frozen", frozen_model), ("trained", runs.model("token"))):
        rows[name] = {**runs.evaluate("token", model), f"recall@{k}": runs.recall(k, model.question_encoder.params)}
    lines = [f"| RAG-Token question encoder | test EM | test F1 | answer recall@{k} |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['em']:.3f} | {r['f1']:.3f} | {r[f'recall@{k}']:.3f} |" for name, r in rows.items()]
    _plot_bars(os.path.join(args.out, "query_encoder.png"), "RAG-Token question encoder",
               {"test EM": {n: r["em"] for n, r in rows.items()},
                f"answer recall@{k}": {n: r[f"recall@{k}"] for n, r in rows.items()}})  # fmt: skip
    return {**rows, "frozen_train_s": train_s}, "\n".join(lines) + "\n\n![question encoder](query_encoder.png)\n"


def score_scale_model(runs: Runs, args, variant: str, setting: str):
    """The ``variant`` model trained with the score-scale ``setting``: the given run when it was trained
    so, else a run trained like it with the setting's changes; returns it and the training seconds
    (None for the given run)."""
    changes, cfg = SCORE_SCALES[setting], runs.cfg[variant]
    if (resolve(with_changes(cfg, **changes)).train == resolve(cfg).train
            and runs.model(variant).score_scale == changes["rag"]["score_scale"]):  # fmt: skip
        return runs.model(variant), None
    run_dir = os.path.join(args.out, "runs", f"{variant}-scale-{setting.replace(' ', '-')}")
    return train_run(cfg, run_dir, args.train_steps, **changes)


def ablate_score_scale(runs: Runs, args) -> tuple[dict, str]:
    result = {}
    for setting in SCORE_SCALES:
        for variant in ("token", "sequence"):
            model, train_s = score_scale_model(runs, args, variant, setting)
            result[f"{setting}/{variant}"] = {"score_scale": model.score_scale, "train_s": train_s,
                                              **{str(k): runs.k_row(variant, model, k) for k in TEST_KS}}  # fmt: skip
    ks = " | ".join(f"k={k}" for k in TEST_KS)
    lines = []
    for metric, title in (("em", "test EM"), ("top_prior", "mean p(top doc given x)"),
                          ("recall_at_k", "answer recall@k")):  # fmt: skip
        drop = f" best EM - EM at k={TEST_KS[-1]} |" if metric == "em" else ""
        lines += [f"{title}:", "", f"| score scale | model | scale after training | {ks} |{drop}",
                  "|---" * (len(TEST_KS) + 3 + bool(drop)) + "|"]  # fmt: skip
        for name, row in result.items():
            setting, variant = name.split("/")
            values = [row[str(k)][metric] for k in TEST_KS]
            drop_value = f" {max(values) - values[-1]:.3f} |" if drop else ""
            lines.append(f"| {setting} | {LABELS[variant]} | {row['score_scale']:.2f} | "
                         + " | ".join(f"{v:.3f}" for v in values) + f" |{drop_value}")  # fmt: skip
        lines.append("")
    given = [name for name, row in result.items() if row["train_s"] is None]
    trained = {name: row["train_s"] for name, row in result.items() if row["train_s"] is not None}
    lines += [f"The given runs: {', '.join(given)}. Trained here, with their steps and settings otherwise: "
              + ", ".join(f"{n} ({s:.0f} s)" for n, s in trained.items()) + " (0 s: trained by an earlier "
              "invocation, reused).", "", "![score scale: EM and p(top doc) against k](score_scale.png)"]  # fmt: skip
    _plot_score_scale(os.path.join(args.out, "score_scale.png"), result)
    return result, "\n".join(lines) + "\n"


# -- plots ---------------------------------------------------------------------------------------


def _axes(ncols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, axes, path: str) -> None:
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(TEST_KS, [str(k) for k in TEST_KS])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_k(path: str, result: dict) -> None:
    plt, fig, (em_ax, recall_ax) = _axes(2)
    for variant in ("token", "sequence"):
        em_ax.plot(TEST_KS, [result[f"{variant}/{k}"]["em"] for k in TEST_KS], marker="o", label=LABELS[variant])
    recall_ax.plot(TEST_KS, [result[f"token/{k}"]["recall_at_k"] for k in TEST_KS], marker="o", label="trained")
    em_ax.set(xlabel="documents retrieved at test time (k)", ylabel="test exact match", title="EM vs k")
    recall_ax.set(xlabel="k", ylabel="answer recall@k", title="retrieval recall vs k", ylim=(0, 1.02))
    _save(plt, fig, (em_ax, recall_ax), path)


def _plot_score_scale(path: str, result: dict) -> None:
    plt, fig, axes = _axes(4)
    panels = [(variant, metric) for metric in ("em", "top_prior") for variant in ("token", "sequence")]
    for ax, (variant, metric) in zip(axes, panels):
        for setting in SCORE_SCALES:
            row = result[f"{setting}/{variant}"]
            ax.plot(TEST_KS, [row[str(k)][metric] for k in TEST_KS], marker="o",
                    label=f"{setting} (after training: {row['score_scale']:.1f})")  # fmt: skip
        ylabel = "test exact match" if metric == "em" else "mean p(top doc given x)"
        ax.set(xlabel="documents retrieved at test time (k)", ylabel=ylabel, title=f"{LABELS[variant]}: {ylabel}",
               ylim=(-0.02, 1.02))  # fmt: skip
    _save(plt, fig, axes, path)


def _plot_bars(path: str, title: str, panels: dict[str, dict[str, float]]) -> None:
    """One bar chart per panel (``{panel title: {bar label: value}}``), side by side."""
    plt, fig, axes = _axes(len(panels))
    for ax, (name, bars) in zip(axes, panels.items()):
        ax.bar(range(len(bars)), list(bars.values()))
        ax.set_xticks(range(len(bars)), list(bars), rotation=15, ha="right")
        ax.set(title=name)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_recall(path: str, recall: dict) -> None:
    plt, fig, (ax,) = _axes(1)
    for name, row in recall.items():
        ax.plot(TEST_KS, row, marker="o", label=name)
    ax.set(xlabel="k", ylabel="answer recall@k", title="BM25 vs dense retrieval (test questions)", ylim=(0, 1.02))
    _save(plt, fig, (ax,), path)


def ablate_end_to_end(runs: Runs, args) -> tuple[dict, str]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import end_to_end

    cfg = runs.cfg["token"]
    steps = args.train_steps or cfg.train.steps
    every = max(steps // 3, 1)
    return end_to_end.end_to_end_table(cfg, args.out, steps=steps,
                                       retriever_learning_rate=1e-4, reindex_every=every, reindex_lag=every // 2,
                                       max_examples=args.max_examples)  # fmt: skip


# -- main ----------------------------------------------------------------------------------------

RUNNERS = {"variant": ablate_variant, "k": ablate_k, "decoding": ablate_decoding, "retriever": ablate_retriever,
           "query_encoder": ablate_query_encoder, "score_scale": ablate_score_scale,
           "end_to_end": ablate_end_to_end}  # fmt: skip
TITLES = {"variant": "Closed-book vs RAG-Sequence vs RAG-Token; index hot-swap", "k": "Documents at test time (k)",
          "decoding": "RAG-Sequence decoding: thorough vs fast", "retriever": "BM25 vs dense retrieval",
          "query_encoder": "Frozen vs trained question encoder",
          "score_scale": "Retrieval score scale: fixed 1 / fixed 20 / learned, against test-time k",
          "end_to_end": "End-to-end retriever training: frozen / query-side / full re-index / re-rank / stale index"}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quickstart", help="a finished `rag-jax quickstart --out` folder (sets the two runs)")
    p.add_argument("--token-run", help="a trained RAG-Token run directory")
    p.add_argument("--sequence-run", help="a trained RAG-Sequence run directory")
    p.add_argument("--split", default="test")
    p.add_argument("--max-examples", type=int, default=0, help="evaluate on the first N questions (0: all)")
    p.add_argument("--only", nargs="+", choices=ABLATIONS, default=list(ABLATIONS))
    p.add_argument("--train-steps", type=int, default=0,
                   help="steps of the ablations' own training runs (0: as many as the given runs; CI's smoke test)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.quickstart:
        args.token_run = args.token_run or os.path.join(args.quickstart, "runs", "token")
        args.sequence_run = args.sequence_run or os.path.join(args.quickstart, "runs", "sequence")
    if not (args.token_run and args.sequence_run):
        p.error("give --quickstart, or both --token-run and --sequence-run")
    os.makedirs(args.out, exist_ok=True)
    runs = Runs(args.token_run, args.sequence_run, args.split, args.max_examples)
    command = "python " + " ".join(sys.argv) if argv is None else "ablations.main(" + repr(argv) + ")"
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)"
    sections = [f"# Ablations\n\nCommand: `{command}`. Machine: {machine}. {len(runs.examples)} {args.split} questions.\n"]
    results = {}
    for name in args.only:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        results[name], table = RUNNERS[name](runs, args)
        sections.append(f"## {TITLES[name]}\n\n{table}\n({time.perf_counter() - start:.0f} s)\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "ablations.md"), "w") as f:
        f.write("\n".join(sections))
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
