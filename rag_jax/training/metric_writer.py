"""Training logs: one JSONL line per record and TensorBoard scalars (tensorboardX), written by
process 0 only in multi-host runs."""

from __future__ import annotations

import json
import os
import time

import jax


class MetricWriter:
    """``write(step, {"loss": ...}, prefix="train")`` appends ``{"step", "time", "train/loss", ...}``
    to ``<directory>/metrics.jsonl`` and the same scalars to TensorBoard under ``<directory>/tb``.

    ``start_step``: a run resumed from the checkpoint of this step; JSONL records of later steps
    (written before the interruption, and about to be written again) are removed, so the file holds
    each step once. TensorBoard shows the latest value of a repeated step."""

    def __init__(self, directory: str, *, enabled: bool | None = None, start_step: int = 0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(directory, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(directory, exist_ok=True)
            self._drop_records_after(start_step)
            self._tb = SummaryWriter(os.path.join(directory, "tb"))

    def _drop_records_after(self, step: int) -> None:
        kept = [r for r in read_metrics(os.path.dirname(self.path)) if r["step"] <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, step: int, metrics: dict, prefix: str) -> None:
        if not self.enabled:
            return
        scalars = {f"{prefix}/{name}": float(value) for name, value in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(directory: str) -> list[dict]:
    """The JSONL records a run wrote (for plots and tests)."""
    path = os.path.join(directory, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
