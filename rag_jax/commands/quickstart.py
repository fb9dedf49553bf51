"""``rag-jax quickstart``: RAG end to end on the embedded synthetic knowledge base, offline, on CPU
(``rag_jax.quickstart.pipeline``): prints the results table and writes it, the training curves and an HF
export under ``--out``."""

from __future__ import annotations

import argparse


def _quickstart(args: argparse.Namespace) -> int:
    from rag_jax.config import apply_override
    from rag_jax.quickstart import pipeline as quickstart

    qc = quickstart.quickstart_config(small=args.small)
    for field, value in (("run.train.steps", args.steps), ("task.entities", args.entities), ("run.seed", args.seed)):
        if value is not None:
            apply_override(qc, f"config.{field}={value}")
    for override in args.overrides:
        apply_override(qc, override)
    quickstart.run(args.out, qc, progress=not args.no_progress)
    return 0


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="train and compare closed-book BART, RAG-Sequence and RAG-Token on a "
                       "synthetic knowledge base (offline, CPU, ~10 min on 2 cores)")  # fmt: skip
    p.add_argument("--out", default="quickstart_out", help="output folder (results.md, plot, runs, export)")
    p.add_argument("--small", action="store_true", help="a ~5-minute version (300 people, 100 steps, frozen question "
                   "encoder; the test suite runs it)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="training steps per model")
    p.add_argument("--entities", type=int, default=None, help="people in the knowledge base")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_quickstart, overrides_allowed=True)  # --config.task.<field>= / --config.run.<field>=
