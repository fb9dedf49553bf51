"""Which default tuning queries make ``ScannIndex.build``'s tuning choose the search settings real queries
need? For each data set: build once, tune to recall@10 0.95 on 500 sampled rows plus noise of 1.0, 0.5 and
0.25 times the rows' per-dimension spread (``perturbed_rows``) and on the real queries themselves, then
measure recall@10 and queries/s of the real queries at the settings chosen. Prints markdown lines.

    python experiments/bench/scann_tuning_queries.py [--rows 200000]

Data: clustered 768-dim vectors (the MIPS benchmark's, ``synthetic.clustered_vectors``) with question-like
queries (``clustered_queries``), and low-rank vectors with heavy-tailed norms (``low_rank_vectors``, 30,000 x
32) with fresh queries from the same process.
"""

from __future__ import annotations

import argparse
import time

from rag_jax.retrieval import ScannIndex, exact_search_numpy
from rag_jax.retrieval.index.scann import perturbed_rows, tune_search
from rag_jax.retrieval.synthetic import clustered_queries, clustered_vectors, low_rank_vectors

NOISES = (1.0, 0.5, 0.25)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="rows of the clustered data")
    args = p.parse_args(argv)
    datasets = {f"clustered {args.rows} x 768": (clustered_vectors(args.rows, 768), clustered_queries(1000, 768, n=args.rows)),
                "low-rank 30000 x 32": (low_rank_vectors(30_000, seed=0), low_rank_vectors(400, seed=1))}  # fmt: skip
    print("| data | tuning queries | leaves (reorder) chosen | recall@10, real queries | queries/s |")
    print("|---|---|---|---|---|")
    for name, (x, real) in datasets.items():
        index = ScannIndex.build(x, target_recall=None)
        real_exact, _ = exact_search_numpy(x, real, 10)
        built = dict(index.meta)
        tuning = [(f"rows + noise x {s}", perturbed_rows(x, 500, noise=s)) for s in NOISES]
        for label, queries in tuning + [("the real queries themselves", real[:500])]:
            index.meta.update(leaves_to_search=built["leaves_to_search"], reorder_factor=built["reorder_factor"])
            chosen = tune_search(index, x, queries, 0.95)
            start = time.perf_counter()
            recall = index.recall(real, real_exact)
            qps = len(real) / (time.perf_counter() - start)
            print(f"| {name} ({built['num_leaves']} leaves) | {label} | {chosen['leaves_to_search']} "
                  f"(x{chosen['reorder_factor']}) | {recall:.3f} | {qps:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
