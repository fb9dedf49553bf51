"""MIPS indexes: ExactIndex (1 and 8 devices) against NumPy, ScaNN recall, sharding, save/load,
tie order and argument checks."""

import jax
import numpy as np
import pytest

from rag_jax.retrieval.index import exact_search_numpy, load_index, merge_topk
from rag_jax.retrieval.index.exact import ExactIndex
from rag_jax.retrieval.index.scann import ScannIndex
from rag_jax.retrieval.index.sharded import ShardedIndex, build_sharded
from rag_jax.retrieval.synthetic import clustered_queries, clustered_vectors

K = 10


def recall(ids, truth):
    return np.mean([len(np.intersect1d(a, b)) / truth.shape[1] for a, b in zip(ids, truth)])


@pytest.fixture(scope="module")
def small():
    """1003 x 24 vectors (not a multiple of 8) and 13 queries."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((1003, 24)).astype(np.float32), rng.standard_normal((13, 24)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered():
    n, d = 20_000, 64
    x, q = clustered_vectors(n, d, norm_sigma=0.1, seed=1), clustered_queries(200, d, n=n, seed=1)
    return x, q, exact_search_numpy(x, q, K)[0]


@pytest.mark.parametrize("num_devices", [1, 8])
def test_exact_index_equals_numpy(small, num_devices):
    x, q = small
    ids_ref, scores_ref = exact_search_numpy(x, q, K)
    # chunk_size 40 < per-device rows: several chunks per device; k=10 <= chunk
    index = ExactIndex.build(x, devices=jax.devices()[:num_devices], chunk_size=40)
    assert index.size == 1003 and index.dim == 24
    ids, scores = index.search(q, K)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (13, K)
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_allclose(scores, scores_ref, rtol=1e-5, atol=1e-5)


def test_exact_index_k_larger_than_chunk(small):
    x, q = small
    index = ExactIndex.build(x, chunk_size=8)  # 8 devices x chunks of 8 rows, k = 50
    ids, _ = index.search(q, 50)
    np.testing.assert_array_equal(ids, exact_search_numpy(x, q, 50)[0])


def test_exact_index_bfloat16_close(small):
    x, q = small
    ids_ref, scores_ref = exact_search_numpy(x, q, K)
    ids, scores = ExactIndex.build(x, dtype="bfloat16").search(q, K)
    assert recall(ids, ids_ref) >= 0.9
    np.testing.assert_allclose(scores, scores_ref, rtol=0.03, atol=0.1)


def test_ties_are_ordered_by_row():
    x = np.zeros((37, 4), np.float32)
    x[[5, 30, 12]] = [1.0, 0, 0, 0]  # three rows tie for the top score
    x[[20, 2]] = [0.5, 0, 0, 0]
    q = np.array([[1.0, 0, 0, 0]], np.float32)
    for index in (ExactIndex.build(x, chunk_size=8), ExactIndex.build(x, devices=jax.devices()[:1])):
        ids, scores = index.search(q, 5)
        assert ids.tolist() == [[5, 12, 30, 2, 20]] and scores.tolist() == [[1, 1, 1, 0.5, 0.5]]


def test_merge_topk_is_pure_and_orders_ties_by_id():
    a = (np.array([[7, 3]]), np.array([[2.0, 1.0]], np.float32))
    b = (np.array([[1, 9]]), np.array([[1.0, 5.0]], np.float32))
    ids, scores = merge_topk([a, b], 3)
    assert ids.tolist() == [[9, 7, 1]] and scores.tolist() == [[5, 2, 1]]
    with pytest.raises(ValueError, match="k=5 but the results hold only 4 candidates"):
        merge_topk([a, b], 5)


def test_scann_recall(clustered):
    x, q, truth = clustered
    # force the tree + AH + reorder path; this small synthetic set needs 20-30% of the leaves for 0.95
    index = ScannIndex.build(x, brute_force_below=0, leaves_fraction=0.3)
    assert index.meta["tree"] and index.meta["spherical"] and not index.meta["mips_trick"] and index.meta["num_leaves"] == 141
    ids, scores = index.search(q, K)
    assert recall(ids, truth) >= 0.95
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[ids]), rtol=1e-5, atol=1e-5)  # exact after reordering


@pytest.mark.parametrize("options", [{"reorder_dtype": "int8"}, {"mips_trick": True}, {"spherical": False}])
def test_scann_options_keep_recall(clustered, options):
    x, q, truth = clustered
    index = ScannIndex.build(x, brute_force_below=0, leaves_fraction=0.3, **options)
    assert all(index.meta[name] == value for name, value in options.items())
    assert recall(index.search(q, K)[0], truth) >= 0.9


def test_scann_refuses_an_unknown_reorder_dtype(clustered):
    with pytest.raises(ValueError, match="reorder_dtype"):
        ScannIndex.build(clustered[0], reorder_dtype="float16")


def test_scann_brute_force_for_small_corpora(small):
    x, q = small
    index = ScannIndex.build(x)
    assert not index.meta["tree"]
    np.testing.assert_array_equal(index.search(q, K)[0], exact_search_numpy(x, q, K)[0])


def test_sharded_exact_equals_unsharded(small):
    x, q = small
    ids_ref, scores_ref = ExactIndex.build(x).search(q, K)
    sharded = build_sharded(x, 3, kind="exact", chunk_size=64)
    assert sharded.offsets == [0, 334, 669] and sharded.size == 1003
    ids, scores = sharded.search(q, K)
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_allclose(scores, scores_ref, rtol=1e-6, atol=1e-6)


def test_sharded_scann_recall(clustered):
    x, q, truth = clustered
    # two 10k-row shards: 100 leaves each, of which smaller corpora need a larger share searched
    sharded = build_sharded(x, 2, kind="scann", brute_force_below=0, leaves_fraction=0.4)
    assert all(s.meta["tree"] for s in sharded.shards)
    assert recall(sharded.search(q, K)[0], truth) >= 0.95


def test_save_load_round_trips(tmp_path, small, clustered):
    x, q = small
    indexes = {
        "exact": ExactIndex.build(x, chunk_size=40),
        "exact-bf16": ExactIndex.build(x, dtype="bfloat16"),
        "scann": ScannIndex.build(clustered[0], brute_force_below=0),
        "sharded": build_sharded(x, 2, kind="exact"),
    }
    for name, index in indexes.items():
        queries = clustered[1] if name == "scann" else q
        before = index.search(queries, K)
        index.save(str(tmp_path / name))
        loaded = load_index(str(tmp_path / name))
        assert type(loaded) is type(index) and (loaded.size, loaded.dim) == (index.size, index.dim)
        after = loaded.search(queries, K)
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(after[1], before[1])
    assert isinstance(ShardedIndex.load(str(tmp_path / "sharded")).shards[0], ExactIndex)
    (tmp_path / "scann" / "scann_docids.pkl").write_bytes(b"not loaded")  # ScaNN's loader would unpickle it
    with pytest.raises(ValueError, match=r"scann_docids.pkl\): refusing to load a pickle"):
        load_index(str(tmp_path / "scann"))
    # an exact index saved from 8 devices loads onto 1
    ids, _ = ExactIndex.load(str(tmp_path / "exact"), devices=jax.devices()[:1]).search(q, K)
    np.testing.assert_array_equal(ids, indexes["exact"].search(q, K)[0])


@pytest.mark.parametrize("kind", ["exact", "scann", "sharded"])
def test_argument_errors(small, kind):
    x, q = small
    build = {
        "exact": lambda **kw: ExactIndex.build(x, **kw),
        "scann": lambda **kw: ScannIndex.build(x, **kw),
        "sharded": lambda **kw: build_sharded(x, 2, kind="exact", **kw),
    }[kind]
    index = build()
    with pytest.raises(ValueError, match="queries have dim 23 but the index has dim 24"):
        index.search(q[:, :23], K)
    with pytest.raises(ValueError, match="k=1004 must be between 1 and the index size 1003"):
        index.search(q, 1004)
    with pytest.raises(ValueError, match="1003 embeddings but 1000 passages"):
        build(passages=range(1000))
