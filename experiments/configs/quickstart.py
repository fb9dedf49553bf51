"""Smoke-run configs on the quickstart's synthetic task, for trying `rag-jax train / eval / export`
on CPU in minutes. Run `rag-jax quickstart --small --out quickstart_out` once first (it writes the
task: passages, questions, embeddings, index, pretrained generator); then e.g.

    rag-jax train --config experiments/configs/quickstart.py:token --config.run_dir=runs/smoke-token
    rag-jax eval --run runs/smoke-token --split test

``arg`` is ``<variant>[@<quickstart out folder>]``, variant in token, sequence, closed_book.
"""

import json
import os

from rag_jax.quickstart import pipeline as quickstart
from rag_jax.quickstart.task import TaskPaths


def get_config(arg: str = "token"):
    variant, _, out = arg.partition("@")
    out = out or "quickstart_out"
    paths_file = os.path.join(out, "task", "paths.json")
    if not os.path.isfile(paths_file):
        raise FileNotFoundError(f"{paths_file} is missing: run `rag-jax quickstart --small --out {out}` first")
    with open(paths_file) as f:
        paths = TaskPaths(**json.load(f))
    return quickstart.variant_config(paths, variant, f"runs/quickstart-{variant}", quickstart.quickstart_config(small=True))
