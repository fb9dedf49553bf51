"""``rag-jax quickstart``: RAG end to end on the embedded synthetic knowledge base, offline, on CPU
(``rag_jax.quickstart.pipeline``): prints the results table and writes it, the training curves and an HF
export under ``--out``."""

from __future__ import annotations

import argparse
import dataclasses


def _quickstart(args: argparse.Namespace) -> int:
    from rag_jax.quickstart import pipeline as quickstart

    settings = quickstart.Settings.small() if args.small else quickstart.Settings()
    changes = {name: getattr(args, name) for name in ("steps", "entities", "seed") if getattr(args, name) is not None}
    quickstart.run(args.out, dataclasses.replace(settings, **changes), progress=not args.no_progress)
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
    p.set_defaults(handler=_quickstart)
