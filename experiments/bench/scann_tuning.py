"""ScaNN's search settings tuned to a target recall at build time (``ScannIndex.build(target_recall=...)``),
on data unlike the MIPS benchmark's (``synthetic.low_rank_vectors``: low rank plus noise, heavy-tailed
norms): for each target, the settings chosen, the recall@10 on the tuning queries and on fresh queries
from the data's own distribution, and the build time. Prints a markdown table.

    python experiments/bench/scann_tuning.py [--rows 30000]
"""

from __future__ import annotations

import argparse
import time

from rag_jax.retrieval import ScannIndex, exact_search_numpy
from rag_jax.retrieval.synthetic import low_rank_vectors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=30_000)
    args = p.parse_args(argv)
    embeddings, fresh = low_rank_vectors(args.rows, seed=0), low_rank_vectors(400, seed=1)
    exact, _ = exact_search_numpy(embeddings, fresh, 10)
    print("| target | leaves searched (of) | reorder factor | recall@10, tuning queries | recall@10, fresh | build s |")
    print("|---|---|---|---|---|---|")
    for target in (None, 0.9, 0.95, 0.97, 0.99):
        start = time.perf_counter()
        index = ScannIndex.build(embeddings, target_recall=target)
        seconds = time.perf_counter() - start
        m = index.meta
        label = "none (10% of the leaves)" if target is None else target
        print(f"| {label} | {m['leaves_to_search']} ({m['num_leaves']}) | {m['reorder_factor']} | "
              f"{m['recall']['recall_at_10']:.3f} | {index.recall(fresh, exact):.3f} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
