"""Where rag_jax's training forward + backward spends its time on the CPU: a ``jax.profiler`` trace of
the jitted loss-and-gradients of ``train_step.py``'s model (same sizes, batch and recipe), with
XLA:CPU's per-thunk trace events on, summed per operation and per kind of operation (the HLO
instruction name without its number: ``ynn_fusion`` are YNNPACK matmul fusions, ``dot`` the dots XLA
runs itself, ``dynamic-slice`` / ``dynamic-update-slice`` fusions the layer scans' slicing of stacked
weights and gradients, ``wrapped_broadcast`` zero buffers, ``copy`` / ``transpose`` fusions layout
copies). Also writes the compiled HLO, to look the instructions up.

    python experiments/bench/profile_step.py --size mid --out experiments/bench/results/profile_mid
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import train_step  # noqa: E402

from rag_jax.hf.rag import load_rag  # noqa: E402

NOT_OPS = ("ThunkExecutor", "$", "Pjit", "SlinkyThreadPool", "while")  # runtime and Python frames, loops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(train_step.SIZES), default="mid")
    parser.add_argument("--calls", type=int, default=2, help="profiled calls (after two untimed ones)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", required=True, help="folder for the trace, the HLO and summary.md")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    size = train_step.SIZES[args.size]
    model = train_step.torch_rag(size, "token")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        trainer = train_step.reference_recipe_trainer(load_rag(folder), "token")
    params = trainer.init_state().params
    batch = jax.device_put(train_step.make_batch(size))
    key = jax.random.key(1)

    def loss_and_grad_norm(params, batch):  # as train_step.py's breakdown: every gradient computed
        value, grads = jax.value_and_grad(lambda p: jnp.sum(trainer.per_example_loss(p, batch, key)))(params)
        return value, optax.global_norm(grads)

    fn = jax.jit(loss_and_grad_norm)
    (out / "step.hlo").write_text(fn.lower(params, batch).compile().as_text())
    for _ in range(2):
        jax.block_until_ready(fn(params, batch))
    with jax.profiler.trace(str(out / "trace"), create_perfetto_trace=True):
        for _ in range(args.calls):
            jax.block_until_ready(fn(params, batch))

    (trace,) = (out / "trace").rglob("*.trace.json.gz")
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op, per_kind = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(NOT_OPS):
            per_op[e["name"]] += e["dur"] / 1e3 / args.calls
            per_kind[re.sub(r"\.\d+$", "", e["name"])] += e["dur"] / 1e3 / args.calls
    lines = [f"# Forward + backward profile, {args.size}, ms per call ({args.calls} calls)", "",
             f"Sum over operations: {sum(per_op.values()):.0f} ms per call.", "",
             "| kind | ms |", "|---|---|"]  # fmt: skip
    lines += [f"| {kind} | {ms:.1f} |" for kind, ms in per_kind.most_common(args.top)]
    lines += ["", "| operation | ms |", "|---|---|"]
    lines += [f"| {op} | {ms:.1f} |" for op, ms in per_op.most_common(args.top)]
    lines += ["", f"Command: `python {' '.join(sys.argv)}`"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
