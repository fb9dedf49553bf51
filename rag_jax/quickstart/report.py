"""The quickstart's report: the results table as markdown and the training curves."""

from __future__ import annotations

from rag_jax.training.metric_writer import read_metrics

VARIANTS = ("closed_book", "sequence", "token")
LABELS = {"closed_book": "BART closed-book", "sequence": "RAG-Sequence", "token": "RAG-Token"}


# the training curves' panels: (metric key, y label, title, log scale)
CURVES = (
    ("train/loss", "training loss (NLL per answer)", "training loss", True),
    ("dev/em", "dev exact match", "dev EM (held-out people)", False),
    ("dev/recall_at_k", "dev answer recall@k", "retrieval: dev answer recall@k", False),
    ("train/retrieval_entropy", "entropy of p(z|x) (nats)", "retrieval: entropy of p(z|x)", False),
    ("train/distinct_passages", "distinct passages per batch", "retrieval: distinct passages per batch", False),
)


def plot_training_curves(out_png: str, runs: dict[str, str]) -> None:
    """The runs' curves, one panel per ``CURVES`` entry (a run without a metric, e.g. closed-book's
    retrieval diagnostics, is left out of that panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    records = {variant: read_metrics(run_dir) for variant, run_dir in runs.items()}
    for ax, (key, ylabel, title, log_scale) in zip(axes.flat, CURVES):
        for variant, rows in records.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if key.startswith("dev/") else None, label=LABELS[variant])
        ax.set(xlabel="step", ylabel=ylabel, title=title, yscale="log" if log_scale else "linear")
        if key in ("dev/em", "dev/recall_at_k"):
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    axes.flat[-1].axis("off")
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
