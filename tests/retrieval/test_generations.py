"""Index generations: build, load and prune; resume after a kill; a build split over two real
processes equal to a single-process one, byte for byte; the saved index's kind; snapshot encode_fn."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from toy_encoder import DIM, SEQ, VOCAB, encode, tokenize

from rag_jax.errors import InputFileError
from rag_jax.models import bert
from rag_jax.models.configs import BertConfig
from rag_jax.models.encoder import Encoder
from rag_jax.retrieval import (
    ExactIndex,
    IndexGenerations,
    Passage,
    PassageStore,
    build_generation,
    build_sharded,
    embed_passages,
    exact_search_numpy,
    index_kind,
    load_embeddings,
    snapshot_encode_fn,
    write_passages_tsv,
)
from rag_jax.retrieval.embed import shard_path

NUM_PASSAGES, BATCH, SHARD = 37, 8, 8  # 5 shards (the last of 5 rows), one batch each; 8 test devices
QUERIES_QxD = np.random.default_rng(2).standard_normal((5, DIM)).astype(np.float32)
SETTINGS = dict(index_kind="exact", batch_size=BATCH, shard_size=SHARD)


def write_corpus(path: str) -> None:
    """NUM_PASSAGES passages titled "title <row>" (the row is how a test tells which were embedded)."""
    rng = np.random.default_rng(1)
    passages = [Passage("", f"title {i}", " ".join(f"w{j}" for j in rng.integers(0, 50, size=rng.integers(2, 15))))
                for i in range(NUM_PASSAGES)]  # fmt: skip
    write_passages_tsv(passages, path)


@pytest.fixture
def corpus_path(tmp_path):
    path = str(tmp_path / "psgs.tsv")
    write_corpus(path)
    return path


@pytest.fixture
def store(corpus_path):
    with PassageStore.open(corpus_path) as s:
        yield s


def shard_bytes(directory: str) -> list[bytes]:
    return [pathlib.Path(shard_path(directory, s)).read_bytes() for s in range(-(-NUM_PASSAGES // SHARD))]


def assert_same_search(index_a, index_b):
    ids_a, scores_a = index_a.search(QUERIES_QxD, 5)
    ids_b, scores_b = index_b.search(QUERIES_QxD, 5)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(scores_a, scores_b)


def tiny_bert_encoder() -> Encoder:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=SEQ)  # fmt: skip
    return Encoder(bert.init_params(cfg, jax.random.key(0)), cfg, pooling="cls", kind="dpr_context")


def test_build_load_and_prune(store, tmp_path):
    encoder = tiny_bert_encoder()
    snapshot = jax.tree.map(lambda p: p * 1.5, encoder.params)  # the encoder "after training"
    encode_snapshot = snapshot_encode_fn(encoder, snapshot)
    generations = IndexGenerations(str(tmp_path / "index_generations"))
    assert not generations.is_complete(120) and generations.complete_steps() == []

    index, embeddings = build_generation(generations, 120, store, encode_snapshot, tokenize, **SETTINGS)
    assert os.path.isfile(os.path.join(generations.path(120), "COMPLETE"))
    assert generations.path(120).endswith("step-00000120") and generations.complete_steps() == [120]

    reference_dir = str(tmp_path / "reference")  # embed_passages' own output for the same snapshot
    embed_passages(store, encode_snapshot, tokenize, reference_dir, batch_size=BATCH, shard_size=SHARD, progress=False)
    reference_NxD = np.asarray(load_embeddings(reference_dir))
    np.testing.assert_array_equal(np.asarray(embeddings), reference_NxD)
    ids, scores = index.search(QUERIES_QxD, 5)
    ref_ids, ref_scores = exact_search_numpy(reference_NxD, QUERIES_QxD, 5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    original_NxD = np.asarray(encoder.encode(*tokenize(["title 0"], ["w1 w2"])))
    assert not np.allclose(np.asarray(encode_snapshot(*tokenize(["title 0"], ["w1 w2"]))), original_NxD)

    loaded_index, _ = generations.load(120, store)
    assert_same_search(loaded_index, index)
    build_generation(generations, 240, store, encode, tokenize, **SETTINGS)
    os.makedirs(generations.embeddings_dir(360))  # a build in flight (no COMPLETE)
    os.makedirs(generations.path(60) + ".deleting")  # a deletion that was interrupted
    with pytest.raises(InputFileError, match="unfinished"):
        generations.load(360, store)
    assert generations.steps() == [120, 240, 360] and generations.complete_steps() == [120, 240]

    assert generations.prune({240, 360}) == [120]
    assert sorted(os.listdir(generations.root)) == ["step-00000240", "step-00000360"]
    assert generations.complete_steps() == [240]
    assert IndexGenerations(str(tmp_path / "absent")).prune([]) == []


def test_killed_build_resumes_to_the_same_generation(store, tmp_path):
    whole = IndexGenerations(str(tmp_path / "whole"))
    whole_index, _ = build_generation(whole, 7, store, encode, tokenize, **SETTINGS)

    calls = {"n": 0}

    def dies_in_the_third_shard(ids, mask):  # one batch per shard
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return encode(ids, mask)

    resumed = IndexGenerations(str(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):
        build_generation(resumed, 7, store, dies_in_the_third_shard, tokenize, **SETTINGS)
    emb_dir = resumed.embeddings_dir(7)
    assert [os.path.exists(shard_path(emb_dir, s)) for s in range(5)] == [True, True, False, False, False]
    assert not resumed.is_complete(7) and resumed.complete_steps() == []
    os.makedirs(resumed.index_dir(7) + ".partial")  # as if an index build had been killed, too
    pathlib.Path(resumed.index_dir(7) + ".partial", "junk").write_text("half")

    calls["n"] = -100  # no more deaths; shards 0 and 1 must not be encoded again
    resumed_index, _ = build_generation(resumed, 7, store, dies_in_the_third_shard, tokenize, **SETTINGS)
    assert calls["n"] == -100 + 3
    assert resumed.is_complete(7) and not os.path.exists(resumed.index_dir(7) + ".partial")
    assert shard_bytes(emb_dir) == shard_bytes(whole.embeddings_dir(7))
    assert_same_search(resumed_index, whole_index)

    # killed after the index was saved, before COMPLETE: a broken index folder is rebuilt
    os.remove(os.path.join(resumed.path(7), "COMPLETE"))
    pathlib.Path(resumed.index_dir(7), "index.json").write_text("{broken")
    rebuilt_index, _ = build_generation(resumed, 7, store, encode, tokenize, **SETTINGS)
    assert_same_search(rebuilt_index, whole_index)


PROCESS_SNIPPET = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests_dir!r})
    from test_generations import QUERIES_QxD, SETTINGS, encode, tokenize
    from rag_jax.retrieval import IndexGenerations, PassageStore, build_generation

    embedded_rows = []

    def recording_tokenize(first, second):  # titles are "title <row>"
        embedded_rows.extend(int(title.split()[1]) for title in first)
        return tokenize(first, second)

    with PassageStore.open({corpus!r}) as store:
        index, _ = build_generation(IndexGenerations({root!r}), 5, store, encode, recording_tokenize, **SETTINGS,
                                    process_index={process_index}, process_count=2, wait_poll_s=0.05,
                                    wait_timeout_s=300)
        ids, _ = index.search(QUERIES_QxD, 5)
    with open({log!r}, "w") as f:
        json.dump({{"rows": sorted(embedded_rows), "ids": ids.tolist()}}, f)
""")


def test_two_processes_split_the_shards_and_match_one(corpus_path, store, tmp_path):
    root = str(tmp_path / "split")
    python_path = os.pathsep.join([str(pathlib.Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": python_path}  # the 8 test devices' XLA_FLAGS too
    logs = [str(tmp_path / f"process-{p}.json") for p in range(2)]
    snippets = [PROCESS_SNIPPET.format(tests_dir=str(pathlib.Path(__file__).parent), corpus=corpus_path, root=root,
                                       process_index=p, log=logs[p]) for p in range(2)]  # fmt: skip
    processes = [subprocess.Popen([sys.executable, "-c", s], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for s in snippets]  # fmt: skip
    outputs = [p.communicate(timeout=600)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(outputs)

    single = IndexGenerations(str(tmp_path / "single"))
    single_index, _ = build_generation(single, 5, store, encode, tokenize, **SETTINGS)
    split = IndexGenerations(root)
    assert split.is_complete(5)
    assert shard_bytes(split.embeddings_dir(5)) == shard_bytes(single.embeddings_dir(5))
    split_index, _ = split.load(5, store)
    assert_same_search(split_index, single_index)
    with open(os.path.join(split.embeddings_dir(5), "manifest.json")) as f:
        assert json.load(f)["complete"]

    results = [json.load(open(log)) for log in logs]
    shard_rows = [list(range(s * SHARD, min((s + 1) * SHARD, NUM_PASSAGES))) for s in range(5)]
    assert results[0]["rows"] == shard_rows[0] + shard_rows[2] + shard_rows[4]  # shards 0, 2, 4
    assert results[1]["rows"] == shard_rows[1] + shard_rows[3]  # shards 1, 3
    single_ids, _ = single_index.search(QUERIES_QxD, 5)
    assert results[0]["ids"] == results[1]["ids"] == single_ids.tolist()


def test_process_zero_names_the_missing_shards_after_its_timeout(store, tmp_path):
    generations = IndexGenerations(str(tmp_path / "gens"))
    missing = r"embedding shards \[1, 3\] \(of processes \[1\]\).*done markers of processes \[1\]"
    with pytest.raises(TimeoutError, match=missing):
        build_generation(generations, 3, store, encode, tokenize, **SETTINGS, process_count=2, wait_poll_s=0.01,
                         wait_timeout_s=0.05)  # fmt: skip
    assert not generations.is_complete(3)
    with pytest.raises(ValueError, match="process_index"):
        build_generation(generations, 3, store, encode, tokenize, **SETTINGS, process_index=2, process_count=2)


def test_index_kind_of_saved_indexes(store, tmp_path):
    vectors_NxD = np.random.default_rng(3).standard_normal((20, DIM)).astype(np.float32)
    ExactIndex.build(vectors_NxD).save(str(tmp_path / "exact"))
    assert index_kind(str(tmp_path / "exact")) == "exact"
    build_sharded(vectors_NxD, 2, kind="exact").save(str(tmp_path / "sharded"))
    with pytest.raises(ValueError, match="sharded index"):
        index_kind(str(tmp_path / "sharded"))

    generations = IndexGenerations(str(tmp_path / "gens"))  # a generation like a run's scann index
    scann_index, _ = build_generation(generations, 1, store, encode, tokenize, batch_size=BATCH, shard_size=SHARD,
                                      index_kind="scann")  # fmt: skip
    assert index_kind(generations.index_dir(1)) == "scann"
    with pytest.raises(ValueError, match="index_kind"):
        build_generation(generations, 2, store, encode, tokenize, batch_size=BATCH, shard_size=SHARD, index_kind="hnsw")
