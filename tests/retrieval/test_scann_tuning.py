"""ScannIndex.build tunes its search settings to a target recall on data unlike the benchmark's
(low-rank plus noise with heavy-tailed norms), and the tuned index meets it on fresh queries from the
data's own distribution; the recall is recorded and reported by `rag-jax build-index`."""

import json

import numpy as np
import pytest

from rag_jax import cli
from rag_jax.retrieval import ScannIndex, exact_search_numpy, load_index
from rag_jax.retrieval.embed import MANIFEST, shard_path
from rag_jax.retrieval.index.scann import perturbed_rows
from rag_jax.retrieval.synthetic import low_rank_vectors

N = 30_000


@pytest.fixture(scope="module")
def data():
    """Low-rank rows plus noise with heavy-tailed norms (30,000 x 32), and 400 fresh queries like them."""
    return low_rank_vectors(N, seed=0), low_rank_vectors(400, seed=1)


def recall_at_10(index, embeddings, queries) -> float:
    exact, _ = exact_search_numpy(embeddings, queries, 10)
    return index.recall(queries, exact)


@pytest.mark.parametrize("target", [0.9, 0.95])
def test_the_tuned_defaults_meet_the_target_on_fresh_queries(data, target):
    embeddings, fresh = data
    index = ScannIndex.build(embeddings, target_recall=target)
    measured = index.meta["recall"]
    assert measured["target"] == target and measured["recall_at_10"] >= target and measured["queries"] == 500
    assert recall_at_10(index, embeddings, fresh) >= target - 0.015  # queries it was not tuned on
    # the fewest leaves that reach it on the tuning queries: the previous count tried falls short
    leaves = index.meta["leaves_to_search"]
    if 1 < leaves < index.meta["num_leaves"]:
        tuning = perturbed_rows(embeddings, 500, seed=0)
        exact, _ = exact_search_numpy(embeddings, tuning, 10)
        assert index.recall(tuning, exact) == measured["recall_at_10"]
        assert index.recall(tuning, exact, leaves_to_search=leaves // 2) < target


def test_a_higher_target_searches_more_and_explicit_settings_are_only_measured(data, caplog):
    embeddings, _ = data
    low = ScannIndex.build(embeddings, target_recall=0.8)
    high = ScannIndex.build(embeddings, target_recall=0.99)  # out of reach here: said, and the most is searched
    assert high.meta["recall"]["recall_at_10"] < 0.99 and "below the target 0.990" in caplog.text
    assert (high.meta["leaves_to_search"], high.meta["reorder_factor"]) > (low.meta["leaves_to_search"], low.meta["reorder_factor"])
    fixed = ScannIndex.build(embeddings, leaves_to_search=3)
    assert fixed.meta["leaves_to_search"] == 3 and fixed.meta["recall"]["target"] is None
    assert 0 < fixed.meta["recall"]["recall_at_10"] <= 1


def test_build_index_reports_the_recall_and_saves_it(data, tmp_path, capsys):
    embeddings, fresh = data
    (tmp_path / "emb").mkdir()  # an embedding job's folder: one shard and its manifest
    np.save(shard_path(str(tmp_path / "emb"), 0), embeddings)
    (tmp_path / "emb" / MANIFEST).write_text(json.dumps({"num_shards": 1, "num_passages": N, "dtype": "float32"}))
    assert cli.main(["build-index", "--kind", "scann", "--embeddings", str(tmp_path / "emb"), "--out",
                     str(tmp_path / "index"), "--target-recall", "0.9"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "recall@10 against exact search on 500 sampled queries" in out and "(target 0.9)" in out
    loaded = load_index(str(tmp_path / "index"))
    assert loaded.meta["recall"]["recall_at_10"] >= 0.9
    assert recall_at_10(loaded, embeddings, fresh) >= 0.9 - 0.015
