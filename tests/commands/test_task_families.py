"""Every task family of ``experiments/configs/paper.py`` end to end: its files written in the format the
config names (DPR's QA TSV, DPR's gzipped biencoder JSON, CuratedTrec's regex answers, MS-MARCO and
Jeopardy generation JSONL, FEVER JSONL), ``rag-jax train`` for two steps with the family's config
(tiny models and corpus in place of the paper's; everything else, decoding included, as configured),
then ``rag-jax eval``: the family's metrics appear in the dev evaluation and the test results."""

import gzip
import json
import os
import re

import pytest

from rag_jax import cli
from rag_jax.data import qa as data
from rag_jax.quickstart import task as quickstart_task
from rag_jax.training.metric_writer import read_metrics
from tests.commands.test_train_cli import TINY_BART, TINY_ENCODER

FEVER_LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny task, its corpus linked where the paper configs look for it (``<root>/psgs_w100.tsv``,
    ``embeddings/``, ``index/``), and its (question, answers) examples per split."""
    task = quickstart_task.prepare_task(str(tmp_path_factory.mktemp("task")), entities=16, generator=TINY_BART,
                                        encoder=TINY_ENCODER, index="exact", embed_max_length=32, progress=False)  # fmt: skip
    root = tmp_path_factory.mktemp("data")
    for source, name in ((task.passages, "psgs_w100.tsv"), (task.embeddings, "embeddings"), (task.index, "index")):
        os.symlink(os.path.abspath(source), root / name)
    examples = {split: data.read_qa(getattr(task, split)).examples[:12] for split in ("train", "dev", "test")}
    return task, root, examples


def write_family_files(dataset: str, folder, examples: dict) -> None:
    """The family's train / dev / test files, in the formats and names its config reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, split_examples in examples.items():
        rows = [(ex.question, ex.answers[0]) for ex in split_examples]
        if dataset == "nq" or (dataset in ("wq", "ct") and split == "test"):  # DPR's qas: question<TAB>["answer"]
            answers = [re.escape(a).replace(r"\ ", r"\s+") if dataset == "ct" else a for _, a in rows]
            (folder / f"{split}.tsv").write_text("".join(f"{q}\t{json.dumps([a])}\n" for (q, _), a in zip(rows, answers)))
        elif dataset in ("wq", "ct"):  # DPR's biencoder JSON, gzipped as distributed
            records = [{"question": q, "answers": [re.escape(a) if dataset == "ct" else a], "positive_ctxs": [],
                        "negative_ctxs": [], "hard_negative_ctxs": []} for q, a in rows]  # fmt: skip
            with gzip.open(folder / f"{split}.json.gz", "wt") as f:
                json.dump(records, f)
        elif dataset in ("msmarco", "jeopardy"):  # {"input", "target"}; Jeopardy generates the question from its answer
            pairs = [(q, f"the answer is {a}") for q, a in rows] if dataset == "msmarco" else [(a, q) for q, a in rows]
            (folder / f"{split}.jsonl").write_text("".join(json.dumps({"input": i, "target": t}) + "\n" for i, t in pairs))
        else:  # FEVER's own JSONL (extra fields ignored)
            (folder / f"{split}.jsonl").write_text("".join(
                json.dumps({"id": i, "verifiable": "VERIFIABLE", "label": FEVER_LABELS[i % 3], "claim": q,
                            "evidence": []}) + "\n" for i, (q, _) in enumerate(rows)))  # fmt: skip


METRICS = {
    "nq": {"em", "f1", "recall_at_k"},
    "wq": {"em", "f1", "recall_at_k"},
    "ct": {"em", "recall_at_k"},
    "msmarco": {"bleu1", "rouge_l"},
    "jeopardy": {"q_bleu1", "bleu1"},
    "fever3": {"label_accuracy"},
    "fever2": {"label_accuracy"},
}


@pytest.mark.parametrize("dataset, variant", [("nq", "token"), ("wq", "sequence"), ("ct", "token"),
                                              ("msmarco", "sequence"), ("jeopardy", "token"), ("fever3", "token"),
                                              ("fever2", "sequence")])  # fmt: skip
def test_each_task_family_trains_and_evaluates_with_its_metrics(corpus, tmp_path, capsys, dataset, variant):
    task, root, examples = corpus
    write_family_files(dataset, root / ("fever" if dataset.startswith("fever") else dataset), examples)
    run_dir = tmp_path / "run"
    tiny = [f"--config.run_dir={run_dir}", f"--config.model.question_encoder={task.encoder}",
            f"--config.model.generator={task.generator}", "--config.train.steps=2", "--config.train.batch_size=8",
            "--config.train.eval_every=2", "--config.train.save_every=2", "--config.train.compute_dtype=float32",
            "--config.data.max_question_length=16", "--config.data.max_source_length=32",
            "--config.data.max_target_length=12", "--config.rag.max_combined_length=48", "--config.eval.k=3",
            "--config.eval.max_length=6", "--config.eval.batch_size=8", "--config.eval.max_examples=8"]  # fmt: skip
    spec = f"experiments/configs/paper.py:{dataset}-{variant}@{root}"
    assert cli.main(["train", "--config", spec, "--no-progress", *tiny]) == 0
    expected = METRICS[dataset]
    dev = [r for r in read_metrics(str(run_dir)) if any(key.startswith("dev/") for key in r)]
    assert [r["step"] for r in dev] == [2] and {f"dev/{m}" for m in expected} <= set(dev[0])
    capsys.readouterr()

    assert cli.main(["eval", "--run", str(run_dir), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert expected <= set(result), result
    assert ("f1" in result) == (dataset not in ("ct",)) and ("label_accuracy" in result) == dataset.startswith("fever")
    with open(result["predictions"]) as f:
        predictions = [json.loads(line) for line in f]
    assert all(len(p["retrieved_ids"]) == 3 for p in predictions)
    if dataset == "fever2":  # NOT ENOUGH INFO claims are left out
        assert predictions and all(p["answers"][0] != "NOT ENOUGH INFO" for p in predictions)
    if dataset == "ct":  # the answers are read as the patterns they are
        assert all("\\" in p["answers"][0] or p["answers"][0].isalnum() for p in predictions)
