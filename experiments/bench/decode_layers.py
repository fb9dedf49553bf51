"""Decoding on CPU with the decoder's layers stacked (``Generator.split``) or unstacked
(``Generator.decode_split``, what ``RagModel.generate`` uses on CPU): ``RagModel.generate`` on the same
random transformers-initialised model and contexts as ``generate.py``, the two states in alternation in one
process, outputs checked equal.

    python experiments/bench/decode_layers.py --size base --variant token --beams 1 --calls 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import generate  # noqa: E402  (the benchmark sizes, models and contexts)
import numpy as np  # noqa: E402

from rag_jax.hf.rag import load_rag  # noqa: E402
from rag_jax.models.generator import Generator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(generate.SIZES), default="base")
    parser.add_argument("--variant", choices=["token", "sequence"], default="token")
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--calls", type=int, default=8, help="timed calls per state")
    args = parser.parse_args()
    size = generate.SIZES[args.size]
    with tempfile.TemporaryDirectory() as folder:
        generate.torch_rag(size, args.variant).save_pretrained(folder)
        rag = load_rag(folder)
    ids, mask, scores = generate.contexts(size, 0)
    kw = dict(variant=args.variant, n_docs=size.n_docs, num_beams=args.beams, max_length=size.max_length,
              min_length=size.max_length)  # fmt: skip
    states = {"stacked": Generator.split, "unstacked": Generator.decode_split}

    def call(state: str) -> tuple[float, np.ndarray]:
        rag.generator.decode_split = states[state].__get__(rag.generator)
        start = time.perf_counter()
        out = np.asarray(rag.generate(ids, mask, scores, **kw))
        return time.perf_counter() - start, out

    first = {state: call(state) for state in states}
    np.testing.assert_array_equal(first["stacked"][1], first["unstacked"][1])
    times = {state: [] for state in states}
    for i in range(args.calls):
        for state in (states if i % 2 else reversed(list(states))):
            times[state].append(call(state)[0])
    print(f"{args.size} RAG-{args.variant} beams {args.beams}, {args.calls} calls per state, outputs identical")
    for state, seconds in times.items():
        print(f"  {state}: first call {first[state][0]:.2f} s, median {np.median(seconds) * 1e3:.1f} ms, "
              f"min {min(seconds) * 1e3:.1f} ms")  # fmt: skip
    print(f"  stacked / unstacked: {np.median(times['stacked']) / np.median(times['unstacked']):.3f}x")


if __name__ == "__main__":
    main()
