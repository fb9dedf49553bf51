"""Training steps/s with retrieval inside the step (``corpus.retriever=device``) against host retrieval,
at the quickstart's size (its knowledge base, MiniLM question encoder, generator, batch 32, k 5), on this
machine's JAX devices. Host retrieval is measured with the current encoder every step
(``train.retrieval_refresh_every=1``, the quickstart's: retrieval waits for the step) and with a refresh every 8
steps (retrieval runs in a background thread ahead of the device). Steady-state rate: the steps after
``--skip`` (compilation), from the loop's own ``train/examples_per_s`` windows. Prints a markdown table.

    python experiments/bench/device_retrieval.py --out /tmp/bench_device [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time

import jax
import numpy as np

from rag_jax.models.configs import BartConfig
from rag_jax.quickstart import task as quickstart_task
from rag_jax.quickstart.pipeline import quickstart_config
from rag_jax.training import loop
from rag_jax.training.metric_writer import read_metrics

SETTINGS = (  # label, corpus overrides, train overrides
    ("host ScaNN, current encoder every step (refresh 1)", {"retriever": "dense"}, {"retrieval_refresh_every": 1}),
    ("host ScaNN, refresh every 8 steps (background)", {"retriever": "dense"}, {"retrieval_refresh_every": 8}),
    ("device, exact, inside the step", {"retriever": "device", "index": ""}, {}),
)


def steady_rate(run_dir: str, skip: int, batch_size: int) -> float:
    """Steps/s over the logged windows that start after step ``skip``."""
    rates = [r["train/examples_per_s"] / batch_size for r in read_metrics(run_dir)
             if "train/examples_per_s" in r and r["step"] > skip]  # fmt: skip
    return float(np.mean(rates))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="working folder (the task is prepared once and reused)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="steps left out of the rate (compilation)")
    args = p.parse_args(argv)
    qc = quickstart_config()
    paths = quickstart_task.prepare_task(os.path.join(args.out, "task"), entities=qc.task.entities,
                                         generator=BartConfig(**qc.task.generator), encoder=qc.task.encoder,
                                         index=qc.task.index, embed_max_length=qc.task.embed_max_length)  # fmt: skip
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, JAX devices: "
          f"{len(jax.devices())} x {jax.devices()[0].device_kind}; quickstart corpus, batch {qc.run.train.batch_size}, "
          f"k {qc.run.rag.k}, {args.steps} steps, rate over steps > {args.skip}\n")  # fmt: skip
    print("| retrieval | steps/s | vs host refresh 1 | wall s (incl. compile) |")
    print("|---|---|---|---|")
    baseline = None
    for label, corpus, train in SETTINGS:
        run_dir = os.path.join(args.out, "runs", label.split(",")[0].replace(" ", "_") + str(len(train)))
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = quickstart_task.run_config(paths, "token", run_dir, base=qc.run, corpus=corpus,
                                         train={"steps": args.steps, "log_every": 5, "eval_every": 10**9,
                                                "save_every": 10**9, **train},
                                         data={"dev": ""})  # fmt: skip
        start = time.perf_counter()
        loop.train(cfg, progress=False)
        wall = time.perf_counter() - start
        rate = steady_rate(run_dir, args.skip, qc.run.train.batch_size)
        baseline = baseline or rate
        print(f"| {label} | {rate:.2f} | {rate / baseline:.2f}x | {wall:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
