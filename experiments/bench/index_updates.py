"""Live index updates (issue 20, item 4): an index updated in place against a fresh build of the updated
corpus. A ``--fraction`` of the rows change (30% of them deleted, 35% replaced, 35% added); for
ScaNN (default build: spherical tree, AH, float32 reordering, search tuned to recall@10 0.95) the
recall@10 against exact search over the updated rows, before and after the update, and of a fresh
build searched with the same settings and with its own tuned ones; the update time (the delete, the
upsert and, within it, the write-back of the reordering rows a spherical tree needs) against the
full build (also at fewer leaves searched, where a stale tree would show); the same times for the
exact index. Two kinds of new vectors: from the corpus's own
clusters, and from clusters the tree was not trained on (new topics). Prints markdown tables.

    python experiments/bench/index_updates.py [--rows 200000] [--dim 64] [--fraction 0.1] [--queries 1000] [--leaves 8 32 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

from rag_jax.retrieval import ExactIndex, ScannIndex, exact_search_numpy
from rag_jax.retrieval.synthetic import clustered_queries, clustered_vectors, default_num_clusters

K = 10


def changes(n: int, fraction: float, seed: int = 0):
    """Rows to delete and to replace (of the rows left), and the number of rows to add."""
    rng = np.random.default_rng(seed)
    changed = round(fraction * n)
    n_delete, n_replace = round(0.3 * changed), round(0.35 * changed)
    deleted = rng.choice(n, n_delete, replace=False)
    return deleted, rng.choice(n - n_delete, n_replace, replace=False), changed - n_delete - n_replace


def apply(index, x, new, deleted, replaced, n_add, timings: dict) -> np.ndarray:
    """Update ``index`` (built over ``x``) and return the rows it should now hold."""
    start = time.perf_counter()
    source = index.delete(deleted)
    timings["delete"] = time.perf_counter() - start
    rows = np.concatenate([replaced, len(source) + np.arange(n_add)])
    start = time.perf_counter()
    index.upsert(rows, new[: len(rows)])
    timings["upsert"] = time.perf_counter() - start
    y = x[source]
    y[replaced] = new[: len(replaced)]
    return np.concatenate([y, new[len(replaced) : len(rows)]])


def timed_restore(timings: dict):
    """Wrap ``ScannIndex._restore_reordering_rows`` to time it (part of ``upsert``)."""
    original = ScannIndex._restore_reordering_rows

    def wrapper(self, rows, db):
        start = time.perf_counter()
        original(self, rows, db)
        timings["restore"] = timings.get("restore", 0.0) + time.perf_counter() - start

    ScannIndex._restore_reordering_rows = wrapper


def recall(index, q, exact, **kwargs) -> float:
    return index.recall(q, exact, **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--leaves", type=int, nargs="*", default=[8, 32, 128], help="leaves searched, besides the tuned count")
    args = p.parse_args(argv)
    n, d = args.rows, args.dim
    clusters = default_num_clusters(n)
    deleted, replaced, n_add = changes(n, args.fraction)
    n_new = len(replaced) + n_add
    x = clustered_vectors(n + n_new, d, num_clusters=clusters, seed=0)
    scenarios = {
        "the corpus's own clusters": (x[n:], clustered_queries(args.queries, d, n=n + n_new, num_clusters=clusters, seed=0)),
        "new clusters (new topics)": (clustered_vectors(n_new, d, num_clusters=clusters, seed=1),
                                      np.concatenate([clustered_queries(args.queries // 2, d, n=n, num_clusters=clusters, seed=0),
                                                      clustered_queries(args.queries - args.queries // 2, d, n=n_new,
                                                                        num_clusters=clusters, seed=1)])),
    }  # fmt: skip
    x = x[:n]
    print(f"{n:,} x {d} float32 rows (synthetic.clustered_vectors), {args.fraction:.0%} changed: {len(deleted):,} deleted, "
          f"{len(replaced):,} replaced, {n_add:,} added; {args.queries} queries; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, jax {jax.default_backend()}\n")  # fmt: skip

    print("| ScaNN, new vectors from | leaves searched x reorder factor | recall@10 before | updated | fresh build, same settings |")
    print("|---|---|---|---|---|")
    notes = []
    for name, (new, q) in scenarios.items():
        timings: dict = {}
        timed_restore(timings)
        start = time.perf_counter()
        index = ScannIndex.build(x)
        build_s = time.perf_counter() - start
        exact_before, _ = exact_search_numpy(x, q, K)
        tuned = {"leaves_to_search": index.meta["leaves_to_search"], "reorder_factor": index.meta["reorder_factor"]}
        sweep = [{**tuned, "leaves_to_search": leaves} for leaves in args.leaves if leaves < tuned["leaves_to_search"]] + [tuned]
        before = [recall(index, q, exact_before, **settings) for settings in sweep]
        y = apply(index, x, new, deleted, replaced, n_add, timings)
        exact, _ = exact_search_numpy(y, q, K)
        start = time.perf_counter()
        fresh = ScannIndex.build(y)
        fresh_s = time.perf_counter() - start
        for settings, was in zip(sweep, before):
            label = f"{settings['leaves_to_search']} x {settings['reorder_factor']}" + (" (tuned)" if settings == tuned else "")
            print(f"| {name} | {label} | {was:.4f} | {recall(index, q, exact, **settings):.4f} | "
                  f"{recall(fresh, q, exact, **settings):.4f} |")  # fmt: skip
        m = fresh.meta
        notes.append(f"{name}: build {build_s:.1f} s (with tuning; {index.meta['num_leaves']} leaves); update "
                     f"{timings['delete'] + timings['upsert']:.2f} s (delete {timings['delete']:.2f} + upsert "
                     f"{timings['upsert']:.2f}, of which the reordering write-back {timings.get('restore', 0.0):.2f}); "
                     f"fresh build {fresh_s:.1f} s, its own tuning {m['leaves_to_search']} x {m['reorder_factor']}: "
                     f"recall@10 {recall(fresh, q, exact):.4f}")  # fmt: skip
    print("\n" + "\n".join(f"- {line}" for line in notes))

    new, q = scenarios["the corpus's own clusters"]
    timings = {}
    start = time.perf_counter()
    index = ExactIndex.build(x)
    index.search(q[:8], K)  # compiled
    build_s = time.perf_counter() - start
    y = apply(index, x, new, deleted, replaced, n_add, timings)
    ids, _ = index.search(q, K)
    fresh = ExactIndex.build(y)
    same = np.array_equal(ids, fresh.search(q, K)[0])
    print(f"\nExact index ({len(jax.devices())} {jax.default_backend()} device(s)): build + first search {build_s:.2f} s; "
          f"update {timings['delete'] + timings['upsert']:.2f} s (delete {timings['delete']:.2f}, upsert {timings['upsert']:.2f}, "
          f"compiles included); results equal to a fresh build's: {same}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
