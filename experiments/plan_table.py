"""The paper-scale plan table of experiments/RESULTS.md: ``rag-jax plan`` for each (row, topology),
one subprocess per cell (TPU cells need libtpu, GPU cells the CUDA plugin: ``--gpu-python`` names a
Python with ``jax[cuda12]`` and rag_jax installed), each cell's JSON kept under ``--dir`` so an
interrupted run resumes where it stopped.

    python experiments/plan_table.py --dir experiments/results/plan --gpu-python /path/to/venv/bin/python

Rows: the paper's training steps (nq-token k = 5, nq-sequence k = 10, batch 128, bfloat16, FSDP over
all devices, remat), test-time decoding (RAG-Sequence thorough k = 50 over 8 questions, RAG-Token beam 4
k = 15 over 32 questions, 25 tokens), ExactIndex search over 21,015,300 x 768 bfloat16 passages (1024 queries),
and the nq-token step retrieving from those passages inside the step (``corpus.retriever=device``: their
embeddings in bfloat16 and their 298 context tokens each, split over the devices).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GiB = 2**30
CONFIG = "experiments/configs/paper.py"
ROWS = (  # label, config arg, program, overrides
    ("nq-token train step (k=5)", "nq-token", "train_step", ()),
    ("nq-sequence train step (k=10)", "nq-sequence", "train_step", ()),
    ("RAG-Sequence thorough decode (k=50, 8 questions)", "nq-sequence", "decode_sequence", ("eval.k=50", "eval.batch_size=8")),
    ("RAG-Token beam 4 decode (k=15)", "nq-token", "decode_token", ("eval.k=15", "eval.num_beams=4")),
    ("ExactIndex 21M x 768 bf16 (1024 queries)", "nq-token", "exact_search", ()),
    ("nq-token train step, retrieval inside it (21M x 768 bf16 + tokens on the devices)", "nq-token", "train_step",
     ("corpus.retriever=device", "corpus.device_dtype=bfloat16")),
)
COLUMNS = {  # label -> topology, per-target overrides (on 256 chips: the batch of 128 over fsdp 128 x model 2,
    # one question per chip when decoding)
    "v5e-8": ("v5e:2x4", ()),
    "v5p-16 (8 chips)": ("v5p:2x2x2", ()),
    "v6e-8": ("v6e:2x4", ()),
    "v5e-256": ("v5e:16x16", ("mesh.fsdp=128", "mesh.model=2", "eval.batch_size=256")),
    "H100 x8": ("h100:8", ()),
    "H200 x8": ("h200:8", ()),
}


def cell_path(directory: str, row: int, column: str) -> str:
    return os.path.join(directory, f"row{row}-{COLUMNS[column][0].replace(':', '_')}.json")


def run_cell(directory: str, row: int, column: str, gpu_python: str | None) -> None:
    _, arg, program, overrides = ROWS[row]
    topology, target_overrides = COLUMNS[column]
    out = cell_path(directory, row, column)
    python = gpu_python if topology[0] in "ah" else sys.executable
    if python is None:
        return
    command = [python, "-m", "rag_jax", "plan", "--config", f"{CONFIG}:{arg}", "--topology", topology,
               "--programs", program, "--out", out]  # fmt: skip
    command += [f"--config.{o}" for o in overrides + target_overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    print(f"{ROWS[row][0]} on {column}: exit {done.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
    if not os.path.exists(out):
        with open(out, "w") as f:
            json.dump({"error": (done.stderr.strip().splitlines() or ["?"])[-1]}, f)


def cell_text(directory: str, row: int, column: str) -> str:
    path = cell_path(directory, row, column)
    if not os.path.exists(path):
        return "not run"
    with open(path) as f:
        plan = json.load(f)
    if "error" in plan:
        return f"error: {plan['error'][:80]}"
    p = plan["programs"][0]
    mfu = "-" if p["est_mfu"] is None else f"{p['est_mfu']:.0%}"
    comm = "-" if not p["est_compute_s"] else f"{p['est_collective_s'] / p['est_compute_s']:.0%}"
    return (f"{'fits' if p['fits'] else '**does not fit**'} {p['bytes_per_device'] / GiB:.1f} GiB; "
            f"{p['hlo_flops_per_device'] * p['num_devices']:.2e} FLOP ({p['hlo_flops_per_device'] * p['num_devices'] / p['model_flops']:.2f}x model); "
            f"est {p['est_step_s']:.3f} s, MFU <= {mfu}, comm/compute {comm}; compile {p['compile_s']:.0f} s")  # fmt: skip


def table(directory: str) -> str:
    lines = ["| program | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for row, (label, *_rest) in enumerate(ROWS):
        lines.append(f"| {label} | " + " | ".join(cell_text(directory, row, c) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="experiments/results/plan")
    parser.add_argument("--gpu-python", default=None, help="a Python with jax[cuda12] (GPU columns skipped without)")
    parser.add_argument("--columns", default=",".join(COLUMNS))
    parser.add_argument("--rows", default=",".join(str(i) for i in range(len(ROWS))))
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    for column in args.columns.split(","):
        for row in map(int, args.rows.split(",")):
            if not os.path.exists(cell_path(args.dir, row, column)):
                run_cell(args.dir, row, column, args.gpu_python)
    text = table(args.dir)
    with open(os.path.join(args.dir, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
