"""A sharded index split over two real processes (``ProcessShardedIndex``, jax.distributed on localhost,
gloo): each process holds only its shards, searches with its own queries (different counts) and gets
exactly the top-k one process with the whole index returns."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rag_jax.retrieval import ShardedIndex, build_sharded, exact_search_numpy

REPO = pathlib.Path(__file__).parents[2]
SNIPPET = textwrap.dedent("""
    import json, os
    import numpy as np
    from rag_jax.training.sharding import maybe_initialize_distributed
    maybe_initialize_distributed()
    import jax
    from rag_jax.retrieval import load_index
    index = load_index({index!r}, processes=(jax.process_index(), jax.process_count()))
    queries = np.load({queries!r})[{rows}]
    ids, scores = index.search(queries, {k})
    with open({log!r}, "w") as f:
        json.dump({{"kind": type(index).__name__, "offsets": index.offsets, "ids": ids.tolist(),
                    "scores": scores.tolist()}}, f)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_two_processes_each_hold_their_shards_and_find_the_global_top_k(tmp_path, kind):
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((600, 16)).astype(np.float32)
    queries = rng.standard_normal((8, 16)).astype(np.float32)
    np.save(tmp_path / "queries.npy", queries)
    build_kw = {"num_leaves": 4, "leaves_to_search": 4, "training_sample_size": 200} if kind == "scann" else {}
    whole = build_sharded(embeddings, 3, kind=kind, **build_kw)  # shards 0 and 2 on process 0, shard 1 on process 1
    whole.save(str(tmp_path / "index"))
    k = 5
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2"}  # fmt: skip
    rows = ["slice(0, 5)", "slice(5, 8)"]  # 5 queries on process 0, 3 on process 1
    logs = [tmp_path / f"process-{p}.json" for p in range(2)]
    processes = [subprocess.Popen([sys.executable, "-c", SNIPPET.format(index=str(tmp_path / "index"),
                                                                        queries=str(tmp_path / "queries.npy"),
                                                                        rows=rows[p], k=k, log=str(logs[p]))],
                                  env={**env, "JAX_PROCESS_ID": str(p)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for p in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    results = [json.loads(log.read_text()) for log in logs]
    assert [r["kind"] for r in results] == ["ProcessShardedIndex"] * 2
    assert [r["offsets"] for r in results] == [[whole.offsets[0], whole.offsets[2]], [whole.offsets[1]]]
    ids = np.array(results[0]["ids"] + results[1]["ids"])
    scores = np.array(results[0]["scores"] + results[1]["scores"], np.float32)
    single_ids, single_scores = ShardedIndex.load(str(tmp_path / "index")).search(queries, k)
    np.testing.assert_array_equal(ids, single_ids)
    np.testing.assert_allclose(scores, single_scores, rtol=1e-6)  # exact shards: 2 devices there, 8 here
    if kind == "exact":  # and that is the exact top-k
        np.testing.assert_array_equal(ids, exact_search_numpy(embeddings, queries, k)[0])


DEVICE_SNIPPET = textwrap.dedent("""
    import json
    import numpy as np
    from rag_jax.training.sharding import maybe_initialize_distributed, make_mesh
    maybe_initialize_distributed()
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from rag_jax.config import MeshConfig
    from rag_jax.retrieval import device
    embeddings, queries = np.load({embeddings!r}), np.load({queries!r})
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, model=1))  # 4 devices, 2 in each process
    tokens = np.repeat(np.arange(len(embeddings), dtype=np.int32)[:, None], 3, axis=1)  # row r's tokens: r, r, r
    asked = []
    def rows(ranges):  # each process is asked for the rows its devices hold
        asked.extend(ranges)
        return [(tokens[a:b], np.full(b - a, 3, np.int32)) for a, b in ranges]
    corpus = device.DeviceCorpus.build(embeddings, rows, mesh, device.ContextTemplate(8, (0,), (2,), 1))
    ids, _ = corpus.index.search(queries[{rows}], {k})  # each process its own queries
    q = jax.make_array_from_callback(queries.shape, NamedSharding(mesh, P()), lambda at: queries[at])
    got = jax.jit(lambda q, arrays: device.retrieve(q, arrays, corpus.layout, {k}))(q, corpus.arrays)
    with open({log!r}, "w") as f:
        json.dump({{"asked": asked, "ids": ids.tolist(), "rows": np.asarray(got.rows_BxK.addressable_data(0)).tolist(),
                    "tokens": np.asarray(got.passage_ids_BxKxL.addressable_data(0))[..., 0].tolist()}}, f)
""")


def test_the_device_corpus_spans_two_processes(tmp_path):
    """``ExactIndex`` / ``DeviceCorpus`` on a mesh over two processes' devices: each process holds its rows;
    the host search (collective, each process with its own queries) and the retrieval inside a jitted
    function both give the exact top-k, and the tokens of the rows found."""
    rng = np.random.default_rng(1)
    embeddings = rng.standard_normal((301, 16)).astype(np.float32)
    queries = rng.standard_normal((8, 16)).astype(np.float32)
    np.save(tmp_path / "embeddings.npy", embeddings)
    np.save(tmp_path / "queries.npy", queries)
    k = 5
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2"}  # fmt: skip
    rows = ["slice(0, 5)", "slice(5, 8)"]
    logs = [tmp_path / f"process-{p}.json" for p in range(2)]
    processes = [subprocess.Popen([sys.executable, "-c", DEVICE_SNIPPET.format(
        embeddings=str(tmp_path / "embeddings.npy"), queries=str(tmp_path / "queries.npy"), rows=rows[p], k=k,
        log=str(logs[p]))], env={**env, "JAX_PROCESS_ID": str(p)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for p in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    results = [json.loads(log.read_text()) for log in logs]
    exact_ids = exact_search_numpy(embeddings, queries, k)[0]
    np.testing.assert_array_equal(np.array(results[0]["ids"] + results[1]["ids"]), exact_ids)
    assert [r["asked"] for r in results] == [[[0, 80], [80, 160]], [[160, 240], [240, 301]]]  # 80 rows per device
    for r in results:  # in the step: every process sees every question's top-k, and their tokens
        np.testing.assert_array_equal(r["rows"], exact_ids)
        np.testing.assert_array_equal(r["tokens"], exact_ids)
