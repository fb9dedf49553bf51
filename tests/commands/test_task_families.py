"""Every task family of ``experiments/configs/paper.py`` end to end (``experiments/task_families.py``): its
files written in the format the config names (DPR's QA TSV, DPR's gzipped biencoder JSON, CuratedTrec's
regex answers, MS-MARCO and Jeopardy generation JSONL, FEVER JSONL), ``rag-jax train`` for two steps with
the family's config (tiny models and corpus in place of the paper's; decoding as configured), then
``rag-jax eval``: the family's metrics appear in the dev evaluation and the test results."""

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).parents[2] / "experiments" / "task_families.py"
spec = importlib.util.spec_from_file_location("task_families", SCRIPT)
task_families = importlib.util.module_from_spec(spec)
spec.loader.exec_module(task_families)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return task_families.tiny_corpus(str(tmp_path_factory.mktemp("families")))


@pytest.mark.parametrize("dataset, variant", task_families.FAMILIES)
def test_each_task_family_trains_and_evaluates_with_its_metrics(corpus, tmp_path, dataset, variant):
    task, data_root, examples = corpus
    result = task_families.run_family(dataset, variant, task, data_root, examples, str(tmp_path / "run"))
    expected = set(task_families.METRICS[dataset])
    assert [r["step"] for r in result["dev"]] == [2] and {f"dev/{m}" for m in expected} <= set(result["dev"][0])
    test = result["test"]
    assert expected <= set(test), test
    assert ("f1" in test) == (dataset != "ct") and ("label_accuracy" in test) == dataset.startswith("fever")
    predictions = result["predictions"]
    test_examples = len(examples["test"]) if dataset != "fever2" else sum(i % 3 != 2 for i in range(len(examples["test"])))
    assert len(predictions) == min(8, test_examples) and all(len(p["retrieved_ids"]) == 3 for p in predictions)
    if dataset == "fever2":  # NOT ENOUGH INFO claims are left out
        assert all(p["answers"][0] != "NOT ENOUGH INFO" for p in predictions)
    if dataset == "ct":  # the answers are read as the patterns they are
        assert all(p["answers"][0] == p["answers"][0].replace(" ", r"\s+") for p in predictions)
    table = task_families.family_table(dataset, variant, result)
    assert all(f"| {m} " in table or f" {m} |" in table for m in expected)
