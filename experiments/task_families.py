"""Every task family of ``experiments/configs/paper.py`` run end to end on tiny synthetic files in its format.

For each family: its train / dev / test files written in the format and under the names its config
reads (DPR's QA TSV; DPR's gzipped biencoder JSON for WebQuestions and CuratedTrec, whose answers are
regular expressions; MS-MARCO and Jeopardy generation JSONL; FEVER's JSONL, 3- and 2-way), from the
questions of a tiny synthetic knowledge base; ``rag-jax train`` for two steps with the family's config
(tiny random models and corpus in place of the paper's, short lengths, ``eval.k`` 3; decoding, beams and
metrics as configured), then ``rag-jax eval`` on the test file. One table per family: its files, its
decoding, and the metrics its dev and test evaluations report (values from random tiny models: the point
is which metrics appear and that every path runs).

    python experiments/task_families.py --out experiments/results/task_families

``tests/commands/test_task_families.py`` runs the same function per family.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import platform
import re
import sys
import time

from rag_jax import cli
from rag_jax.config import load_config
from rag_jax.data import qa as data
from rag_jax.models.configs import BartConfig, BertConfig
from rag_jax.quickstart import task as quickstart_task
from rag_jax.training.metric_writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(REPO, "experiments", "configs", "paper.py")
FAMILIES = (("nq", "token"), ("wq", "sequence"), ("ct", "token"), ("msmarco", "sequence"), ("jeopardy", "token"),
            ("fever3", "token"), ("fever2", "sequence"))  # fmt: skip
METRICS = {  # what each family's evaluation must report
    "nq": ("em", "f1", "recall_at_k"),
    "wq": ("em", "f1", "recall_at_k"),
    "ct": ("em", "recall_at_k"),  # regex match: EM alone
    "msmarco": ("bleu1", "rouge_l"),
    "jeopardy": ("q_bleu1", "bleu1"),
    "fever3": ("label_accuracy",),
    "fever2": ("label_accuracy",),
}
FEVER_LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")
MSMARCO_PREFIX = "the answer is"
TARGET_WORDS = (*FEVER_LABELS, MSMARCO_PREFIX)  # the generator's word-level tokenizer must know the targets' words
TINY_ENCODER = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                          max_position_embeddings=64)  # fmt: skip
TINY_BART = BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                       dropout=0.1)  # fmt: skip
TINY_SETTINGS = ("--config.train.batch_size=8", "--config.train.compute_dtype=float32", "--config.train.warmup_steps=1",
                 "--config.train.learning_rate=3e-3", "--config.train.clip_norm=1.0",  # the paper's 3e-5 and 0.1 suit BART-large
                 "--config.data.max_question_length=16", "--config.data.max_source_length=32",
                 "--config.data.max_target_length=12", "--config.rag.max_combined_length=48", "--config.eval.k=3",
                 "--config.eval.max_length=6", "--config.eval.batch_size=8", "--config.eval.max_examples=8")  # fmt: skip


def tiny_corpus(root: str, examples_per_split: int = 12):
    """A tiny task under ``root/task``, its corpus linked where the paper configs look for it
    (``root/data/psgs_w100.tsv``, ``embeddings/``, ``index/``); returns (task paths, data root, the
    task's (question, answers) examples per split)."""
    task = quickstart_task.prepare_task(os.path.join(root, "task"), entities=16, generator=TINY_BART,
                                        encoder=TINY_ENCODER, index="exact", embed_max_length=32,
                                        extra_words=TARGET_WORDS, progress=False)  # fmt: skip
    data_root = os.path.join(root, "data")
    os.makedirs(data_root, exist_ok=True)
    for source, name in ((task.passages, "psgs_w100.tsv"), (task.embeddings, "embeddings"), (task.index, "index")):
        if not os.path.lexists(os.path.join(data_root, name)):
            os.symlink(os.path.abspath(source), os.path.join(data_root, name))
    examples = {split: data.read_qa(getattr(task, split)).examples[:examples_per_split]
                for split in ("train", "dev", "test")}  # fmt: skip
    return task, data_root, examples


def family_folder(dataset: str) -> str:
    return "fever" if dataset.startswith("fever") else dataset


def write_family_files(dataset: str, folder: str, examples: dict) -> None:
    """The family's train / dev / test files, in the formats and names its config reads."""
    os.makedirs(folder, exist_ok=True)

    def write(name: str, lines) -> None:
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(line + "\n" for line in lines)

    for split, split_examples in examples.items():
        rows = [(ex.question, ex.answers[0]) for ex in split_examples]
        if dataset == "ct":  # CuratedTrec's answers are patterns
            rows = [(q, re.escape(a).replace(r"\ ", r"\s+")) for q, a in rows]
        if dataset in ("nq", "tqa") or (dataset in ("wq", "ct") and split == "test"):  # DPR's qas: question<TAB>[...]
            write(f"{split}.tsv", (f"{q}\t{json.dumps([a])}" for q, a in rows))
        elif dataset in ("wq", "ct"):  # DPR's biencoder JSON, gzipped as distributed
            records = [{"question": q, "answers": [a], "positive_ctxs": [], "negative_ctxs": [], "hard_negative_ctxs": []}
                       for q, a in rows]  # fmt: skip
            with gzip.open(os.path.join(folder, f"{split}.json.gz"), "wt") as f:
                json.dump(records, f)
        elif dataset in ("msmarco", "jeopardy"):  # {"input", "target"}; Jeopardy generates the question from its answer
            pairs = [(q, f"{MSMARCO_PREFIX} {a}") for q, a in rows] if dataset == "msmarco" else [(a, q) for q, a in rows]
            write(f"{split}.jsonl", (json.dumps({"input": i, "target": t}) for i, t in pairs))
        else:  # FEVER's own JSONL (extra fields ignored)
            write(f"{split}.jsonl", (json.dumps({"id": i, "verifiable": "VERIFIABLE", "label": FEVER_LABELS[i % 3],
                                                 "claim": q, "evidence": []}) for i, (q, _) in enumerate(rows)))  # fmt: skip


def _cli(args: list[str]) -> dict:
    """``rag-jax <args>``'s JSON result line (it must succeed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(args)
    if status != 0:
        raise RuntimeError(f"rag-jax {args[0]} failed ({status}): {out.getvalue()[-2000:]}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def run_family(dataset: str, variant: str, task, data_root: str, examples: dict, run_dir: str, steps: int = 2) -> dict:
    """Write the family's files, train ``steps`` steps with its config (tiny models: learning rate 3e-3,
    clipping at 1.0),
    evaluate on its test file. Returns
    ``{"config", "dev"`` (the logged dev metrics)``, "test"`` (``rag-jax eval``'s result)``, "predictions"}``."""
    write_family_files(dataset, os.path.join(data_root, family_folder(dataset)), examples)
    spec = f"{PAPER}:{dataset}-{variant}@{data_root}"
    models = [f"--config.run_dir={run_dir}", f"--config.model.question_encoder={task.encoder}",
              f"--config.model.generator={task.generator}"]  # fmt: skip
    cadence = [f"--config.train.{field}={steps}" for field in ("steps", "eval_every", "save_every")]
    _cli(["train", "--config", spec, "--no-progress", *models, *TINY_SETTINGS, *cadence])
    dev = [r for r in read_metrics(run_dir) if any(key.startswith("dev/") for key in r)]
    test = _cli(["eval", "--run", run_dir, "--split", "test"])
    with open(test["predictions"]) as f:
        predictions = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "checkpoints", "config.json")) as f:
        config = json.load(f)
    return {"config": config, "dev": dev, "test": test, "predictions": predictions}


def family_table(dataset: str, variant: str, result: dict) -> str:
    c = result["config"]
    d, e = c["data"], c["eval"]
    paper = load_config(f"{PAPER}:{dataset}-{variant}").eval  # the family's test-time decoding (this run: k 3)
    decoding = f"{paper.k} documents, {paper.num_beams} beam(s)" + (f", {paper.decoding}" if variant == "sequence" else "")
    assert (e["num_beams"], e["decoding"]) == (paper.num_beams, paper.decoding)
    dev = result["dev"][-1]
    names = METRICS[dataset]
    lines = [f"### {dataset} ({variant})", "",
             f"Files: `{os.path.basename(d['train'])}`, `{os.path.basename(d['dev'])}`, `{os.path.basename(d['test'])}`"
             + (f"; labels kept: {d['labels']}" if d["labels"] else "") + f". Answer match: {e['answer_match']}. "
             f"Test-time decoding (config; the tiny run retrieves 3): {decoding}. Best checkpoint by `{c['train']['best_metric']}`.", "",
             "| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             f"| dev (step {dev['step']}) | " + " | ".join(f"{dev[f'dev/{m}']:.3f}" for m in names) + " |",
             f"| test (step {result['test']['step']}, {len(result['predictions'])} examples) | "
             + " | ".join(f"{result['test'][m]:.3f}" for m in names) + " |", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2, help="training steps per family")
    args = p.parse_args(argv)
    start = time.perf_counter()
    task, data_root, examples = tiny_corpus(os.path.join(args.out, "work"))
    tables = []
    for dataset, variant in FAMILIES:
        result = run_family(dataset, variant, task, data_root, examples,
                            os.path.join(args.out, "work", "runs", f"{dataset}-{variant}"), args.steps)  # fmt: skip
        tables.append(family_table(dataset, variant, result))
        print(tables[-1], flush=True)
    command = "python " + " ".join(sys.argv) if argv is None else f"task_families.main({argv!r})"
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)"
    header = (f"# Task families end to end (tiny)\n\nCommand: `{command}`. Machine: {machine}; "
              f"{time.perf_counter() - start:.0f} s. Tiny random models trained {args.steps} steps on 12 synthetic "
              "examples, so the values only show that each family's metrics are computed (and move with training); "
              "the decoding is the family's config's.\n\n")  # fmt: skip
    with open(os.path.join(args.out, "task_families.md"), "w") as f:
        f.write(header + "\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
