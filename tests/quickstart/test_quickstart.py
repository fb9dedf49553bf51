"""The quickstart pipeline at a reduced size (``rag-jax quickstart --small``): every stage runs, the
table has its structure, and RAG answers questions about held-out people that closed-book BART
cannot.

It runs the command a user runs, in a subprocess with one CPU device (as on a user's machine; the
suite's 8 simulated devices split the CPU threads and make it several times slower)."""

import json
import os
import subprocess
import sys

from rag_jax.quickstart import report as quickstart


def test_small_quickstart_rag_beats_closed_book(tmp_path):
    out = tmp_path / "quickstart_out"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    process = subprocess.run([sys.executable, "-m", "rag_jax", "quickstart", "--small", "--out", str(out),
                              "--no-progress"], env=env, capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
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
