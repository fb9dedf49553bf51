"""The embedding job: shards, manifest, dtypes, multi-device batches, and bit-identical resume."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from toy_encoder import DIM, encode, tokenize

from rag_jax.retrieval.corpus import Passage, PassageStore, write_passages_tsv
from rag_jax.retrieval.embed import (
    EmbeddingShards,
    embed_passages,
    hf_tokenize_fn,
    load_embeddings,
    passage_inputs,
    shard_path,
)


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(1)
    passages = [Passage("", f"title {i}", " ".join(f"w{j}" for j in rng.integers(0, 50, size=rng.integers(2, 15)))) for i in range(37)]
    path = str(tmp_path / "psgs.tsv")
    write_passages_tsv(passages, path)
    with PassageStore.open(path) as s:
        yield s


def reference(store, mode="pair"):
    return np.asarray(encode(*tokenize(*passage_inputs(store.slice(0, len(store)), mode))))


def test_embeds_every_passage_in_shards(store, tmp_path):
    out = str(tmp_path / "emb")
    manifest = embed_passages(store, encode, tokenize, out, batch_size=8, shard_size=16, progress=False)
    assert manifest["complete"] and manifest["num_shards"] == 3 and manifest["dim"] == DIM
    assert [np.load(shard_path(out, s)).shape[0] for s in range(3)] == [16, 16, 5]
    emb = load_embeddings(out, store=store)
    assert isinstance(emb, EmbeddingShards) and emb.shape == (37, DIM)
    np.testing.assert_allclose(np.asarray(emb), reference(store), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(emb[10:20], np.asarray(emb)[10:20])  # slices across shards
    np.testing.assert_array_equal(emb[17], np.asarray(emb)[17])
    assert isinstance(load_embeddings(out, mmap=False), np.ndarray)
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["source"]["num_passages"] == 37


def test_interrupted_job_resumes_bit_identical(store, tmp_path):
    full = str(tmp_path / "full")
    embed_passages(store, encode, tokenize, full, batch_size=8, shard_size=16, progress=False)

    calls = {"n": 0}

    def dies_in_the_third_shard(ids, mask):  # 2 batches per shard
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt("killed")
        return encode(ids, mask)

    part = str(tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        embed_passages(store, dies_in_the_third_shard, tokenize, part, batch_size=8, shard_size=16, progress=False)
    done = sorted(f for f in os.listdir(part) if f.startswith("embeddings-"))
    assert done == ["embeddings-00000.npy", "embeddings-00001.npy"]  # complete shards only, no temp files
    with pytest.raises(ValueError, match="incomplete: 1 of 3 shards missing"):
        load_embeddings(part)
    calls["n"] = 0
    embed_passages(store, dies_in_the_third_shard, tokenize, part, batch_size=8, shard_size=16, progress=False)
    assert calls["n"] == 1  # only the missing shard was encoded
    for s in range(3):
        with open(shard_path(full, s), "rb") as a, open(shard_path(part, s), "rb") as b:
            assert a.read() == b.read()


def test_rerun_with_other_settings_is_refused(store, tmp_path):
    out = str(tmp_path / "emb")
    embed_passages(store, encode, tokenize, out, batch_size=8, shard_size=16, progress=False)
    with pytest.raises(ValueError, match="shard_size: 16 in the folder, 8 now"):
        embed_passages(store, encode, tokenize, out, batch_size=8, shard_size=8, progress=False)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_dtypes(store, tmp_path, dtype):
    out = str(tmp_path / dtype)
    embed_passages(store, encode, tokenize, out, batch_size=8, shard_size=16, dtype=dtype, devices=jax.devices()[:1], progress=False)
    emb = np.asarray(load_embeddings(out))
    expected_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    assert emb.dtype == expected_dtype
    np.testing.assert_array_equal(emb, reference(store).astype(expected_dtype))
    if dtype == "bfloat16":  # raw bits on disk
        assert np.load(shard_path(out, 0)).dtype == np.uint16


def test_input_modes_and_batch_checks(store, tmp_path):
    out = str(tmp_path / "text")
    embed_passages(store, encode, tokenize, out, batch_size=8, shard_size=40, input_mode="text", progress=False)
    np.testing.assert_allclose(np.asarray(load_embeddings(out)), reference(store, "text"), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        embed_passages(store, encode, tokenize, str(tmp_path / "x"), batch_size=6, shard_size=40, progress=False)
    with pytest.raises(ValueError, match="store has 2 passages"):
        load_embeddings(out, store=_TwoPassages())


class _TwoPassages:
    def __len__(self):
        return 2


def test_hf_tokenize_fn_pairs_title_and_text():
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "aaron", "is", "a", "prophet"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    ids, mask = hf_tokenize_fn(tokenizer, max_length=10)(*passage_inputs([Passage("1", "Aaron", "is a prophet")]))
    assert ids.tolist() == [[2, 5, 3, 6, 7, 8, 3, 0, 0, 0]] and mask.sum() == 7
