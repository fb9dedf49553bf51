"""The quickstart pipeline at a reduced size (``rag-jax quickstart --small``): every stage runs, the
table has its structure, and RAG answers questions about held-out people that closed-book BART
cannot; then every ablation of ``experiments/ablations.py`` runs on its output (a smoke test, so the
script cannot rot).

They run the commands a user runs, in subprocesses with one CPU device (as on a user's machine; the
suite's 8 simulated devices split the CPU threads and make it several times slower)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from rag_jax.quickstart import report as quickstart

ONE_DEVICE = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
ABLATIONS = pathlib.Path(__file__).parents[2] / "experiments" / "ablations.py"


@pytest.fixture(scope="module")
def small_quickstart(tmp_path_factory):
    """The output folder of ``rag-jax quickstart --small`` and the command's stdout."""
    out = tmp_path_factory.mktemp("quickstart") / "quickstart_out"
    process = subprocess.run([sys.executable, "-m", "rag_jax", "quickstart", "--small", "--out", str(out),
                              "--no-progress"], env=ONE_DEVICE, capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    return out, process


def test_small_quickstart_rag_beats_closed_book(small_quickstart):
    out, process = small_quickstart
    result = json.loads((out / "results.json").read_text())
    models = result["models"]
    assert set(models) == set(quickstart.VARIANTS)
    assert all({"em", "f1", "train_s"} <= set(row) for row in models.values())
    assert {"recall_at_k"} <= set(models["token"]) and {"recall_at_k"} <= set(models["sequence"])
    assert 0 <= result["recall_before"] <= 1

    table = (out / "results.md").read_text()
    assert table in process.stdout  # the table is printed
    for label in quickstart.LABELS.values():
        assert f"| {label} |" in table
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert (out / "export" / "rag_token" / "config.json").is_file()
    swap = result["hot_swap"]
    assert swap["questions"] > 0 and {"before_em_new_facts", "after_em_new_facts"} <= set(swap)

    # the knowledge is in the corpus only: retrieval is what answers
    assert models["closed_book"]["em"] <= 0.1
    for variant in ("token", "sequence"):
        assert models[variant]["em"] >= models["closed_book"]["em"] + 0.25, models


def test_ablations_run_on_the_quickstart(small_quickstart, tmp_path):
    """Every ablation, on a few test questions with 2-step training runs: each writes its section,
    its plot where it has one, and its results."""
    out, _ = small_quickstart
    process = subprocess.run([sys.executable, str(ABLATIONS), "--quickstart", str(out), "--max-examples", "6",
                              "--train-steps", "2", "--out", str(tmp_path)],
                             env=ONE_DEVICE, capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    spec = importlib.util.spec_from_file_location("ablations", ABLATIONS)
    ablations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablations)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == set(ablations.ABLATIONS)
    report = (tmp_path / "ablations.md").read_text()
    for title in ablations.TITLES.values():
        assert f"## {title}" in report
    for plot in ("k.png", "recall.png", "score_scale.png"):
        assert (tmp_path / plot).stat().st_size > 10_000, plot
    assert results["k"]["token/1"]["recall_at_k"] <= results["k"]["token/50"]["recall_at_k"]

