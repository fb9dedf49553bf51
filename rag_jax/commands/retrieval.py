"""``rag-jax split-corpus`` (documents into DPR-style passages with stable ids), ``rag-jax embed``
(encode every passage of a corpus into embedding shards, resumably), ``rag-jax build-index``
(build a ScaNN or exact MIPS index over them and save it) and ``rag-jax update-index`` (add, replace
and delete passages of such a corpus without embedding it again or retraining the index: only the new
and changed passages are encoded; ``rag_jax.retrieval.update``).

``embed`` wraps ``rag_jax.retrieval.embed_passages``: a progress bar with throughput and ETA; a
re-run with the same arguments skips the complete shards and gives the same bytes as one
uninterrupted run; other settings in an existing folder are refused. The encoder folder holds the
model (DPR context encoder, BertModel or sentence-transformers) and its tokenizer. Across P
processes (``--process-index i --process-count P`` for independent jobs on a cluster scheduler, or
by default the processes of a ``jax.distributed`` run) process i embeds shards i, i + P, ...: the
union is the single-process result, byte for byte, and each process's part resumes on its own.
"""

from __future__ import annotations

import argparse
import os
import time

from rag_jax.errors import ConfigError, named_by

INDEX_KINDS = ("scann", "exact")
REBUILD_AFTER = 0.25  # share of a ScaNN index's rows changed since its build past which update-index suggests a rebuild
SCANN_OPTIONS = ("num_leaves", "leaves_to_search", "reorder_factor", "reorder_dtype", "target_recall")


def _folder_size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def _embed(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from rag_jax.hf.encoder import load_encoder
    from rag_jax.retrieval import PassageStore, embed_passages, hf_tokenize_fn
    from rag_jax.retrieval.embed import num_shards

    process_index, process_count = _embed_processes(args)
    with named_by("--passages"):  # before the encoder loads, so a corpus mistake shows at once
        store = PassageStore.open(args.passages, format=args.format, strict=args.strict, progress=True)
    with store:
        shards = None if process_count == 1 else range(process_index, num_shards(len(store), args.shard_size),
                                                       process_count)  # fmt: skip
        encoder = load_encoder(args.encoder, pooling=args.pooling)
        tokenizer = AutoTokenizer.from_pretrained(args.encoder)
        start = time.perf_counter()
        manifest = embed_passages(
            store, encoder.encode, hf_tokenize_fn(tokenizer, args.max_length), args.out,
            batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype, input_mode=args.input_mode,
            encoder_name=os.path.abspath(args.encoder), shards=shards,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    state = "complete" if manifest["complete"] else "INCOMPLETE"
    part = "" if shards is None else f"process {process_index} of {process_count}: its shards done, the job "
    print(f"embedded {manifest['num_passages']} passages -> [{manifest['num_passages']}, {manifest['dim']}] "
          f"{manifest['dtype']} in {manifest['num_shards']} shard(s), {part}{state}; {seconds:.1f} s this run; "
          f"{args.out} ({_mib(_folder_size(args.out))})")  # fmt: skip
    return 0 if manifest["complete"] or shards is not None else 1


def _embed_processes(args: argparse.Namespace) -> tuple[int, int]:
    """(index, count) of this process among those sharing the job: the flags, else jax.distributed's."""
    if args.process_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    if args.process_count < 1 or not 0 <= (args.process_index or 0) < args.process_count:
        raise ConfigError(f"must be in [0, {args.process_count}) with --process-count {args.process_count}",
                          what="--process-index")  # fmt: skip
    return args.process_index or 0, args.process_count


def _split_corpus(args: argparse.Namespace) -> int:
    from rag_jax.retrieval.split import split_documents

    if args.words < 1:
        raise ConfigError(f"must be at least 1, got {args.words}", what="--words")
    counts = split_documents(args.documents, args.out, words=args.words, strict=args.strict)
    skipped = f", {counts['skipped']} skipped (see the warnings)" if counts["skipped"] else ""
    print(f"split {counts['documents']} documents into {counts['passages']} passages of up to {args.words} words"
          f"{skipped} -> {args.out}")  # fmt: skip
    return 0


def _index_build_kwargs(args: argparse.Namespace) -> dict:
    """The index class's build options from the flags; refuses a flag of the other kind."""
    scann = {name: getattr(args, name) for name in SCANN_OPTIONS if getattr(args, name) is not None}
    if args.kind == "scann":
        if args.dtype is not None:
            raise ConfigError("applies to --kind exact only", what="--dtype")
        return scann
    if scann:
        flags = ", ".join("--" + name.replace("_", "-") for name in scann)
        raise ConfigError("apply to --kind scann only", what=flags)
    return {"dtype": args.dtype or "float32"}


def _build_index(args: argparse.Namespace) -> int:
    from rag_jax.retrieval import ExactIndex, PassageStore, ScannIndex, build_sharded, load_embeddings

    build_kwargs = _index_build_kwargs(args)
    if args.passages:
        with named_by("--passages"):
            store = PassageStore.open(args.passages)
        with store, named_by("--embeddings"):
            embeddings = load_embeddings(args.embeddings, mmap=True, store=store)
    else:
        with named_by("--embeddings"):
            embeddings = load_embeddings(args.embeddings, mmap=True)
    start = time.perf_counter()
    if args.shards > 1:
        index = build_sharded(embeddings, args.shards, kind=args.kind, **build_kwargs)
    else:
        index = {"scann": ScannIndex, "exact": ExactIndex}[args.kind].build(embeddings, **build_kwargs)
    build_seconds = time.perf_counter() - start
    index.save(args.out)
    shards = f" in {args.shards} shards" if args.shards > 1 else ""
    print(f"built a {args.kind} index over [{index.size}, {index.dim}]{shards} in {build_seconds:.1f} s; "
          f"saved to {args.out} ({_mib(_folder_size(args.out))}){_recall_note(index)}")  # fmt: skip
    return 0


def _recall_note(index) -> str:
    """What a ScaNN build measured (``meta["recall"]``, per shard when sharded), or ""."""
    measured = [shard.meta["recall"] for shard in getattr(index, "shards", [index]) if "recall" in getattr(shard, "meta", {})]
    if not measured:
        return ""
    key = next(name for name in measured[0] if name.startswith("recall_at_"))
    settings = ", ".join(f"{m['leaves_to_search']} leaves x reorder {m['reorder_factor']}" for m in measured)
    target = f" (target {measured[0]['target']})" if measured[0]["target"] is not None else ""
    return (f"; recall@{key.rsplit('_', 1)[1]} against exact search on "
            f"{measured[0]['queries']} sampled queries: {min(m[key] for m in measured):.3f}{target}, searching {settings}")


def _update_index(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from rag_jax.hf.encoder import load_encoder
    from rag_jax.retrieval import PassageStore, hf_tokenize_fn, load_index, read_manifest
    from rag_jax.retrieval.update import plan_updates, read_updates, update_corpus

    with named_by("--embeddings"):
        encoder_name = read_manifest(args.embeddings).get("encoder_name")
    if encoder_name and encoder_name != os.path.abspath(args.encoder):
        raise ConfigError(f"the embeddings were made by {encoder_name}; new passages must be encoded by the same "
                          "encoder", what="--encoder")  # fmt: skip
    if os.path.exists(args.out) and os.listdir(args.out):
        raise ConfigError(f"{args.out} exists and is not empty: the updated corpus goes to a new folder", what="--out")
    with named_by("--passages"):
        store = PassageStore.open(args.passages, progress=True)
    with store:
        plan_updates(store, read_updates(args.updates), args.updates)  # a bad line fails before anything loads
        with named_by("--index"):
            index = load_index(args.index)
        encoder = load_encoder(args.encoder, pooling=args.pooling)
        tokenizer = AutoTokenizer.from_pretrained(args.encoder)
        result = update_corpus(store, args.embeddings, index, args.updates, args.out, encoder.encode,
                               hf_tokenize_fn(tokenizer, args.max_length), batch_size=args.batch_size)  # fmt: skip
    c, t = result.counts, result.seconds
    print(f"updated {c['before']} passages: {c['added']} added, {c['replaced']} replaced, {c['deleted']} deleted -> "
          f"{c['after']}; embedded {c['added'] + c['replaced']} in {t['embed']:.1f} s, index updated in {t['index']:.1f} s "
          f"without retraining, written in {t['write']:.1f} s to {args.out} (passages.{store.format}, embeddings/, "
          f"index/){_changed_note(result.index)}")  # fmt: skip
    result.store.close()
    return 0


def _changed_note(index) -> str:
    """The share of a ScaNN index's rows changed since its build (its tree and codebooks are that old), or ""."""
    metas = [getattr(shard, "meta", {}) for shard in getattr(index, "shards", [index])]
    updates = [meta["updates"] for meta in metas if meta.get("tree") and "updates" in meta]  # brute force: exact anyway
    if not updates:
        return ""
    changed = sum(u["replaced"] + u["added"] + u["deleted"] for u in updates) / sum(u["built_size"] for u in updates)
    return (f"; {changed:.1%} of the rows changed since the ScaNN build (tree and codebooks kept: rebuild with "
            f"`rag-jax build-index` when this grows past {REBUILD_AFTER:.0%})")


def register(sub) -> None:
    embed = sub.add_parser("embed", help="encode every passage of a TSV/JSONL corpus into embedding shards (resumable)")
    embed.add_argument("--passages", required=True, help="DPR-style TSV (id, text, title) or JSONL passages")
    embed.add_argument("--encoder", required=True, help="passage encoder folder (DPR context encoder, BERT or "
                       "sentence-transformers) with its tokenizer")  # fmt: skip
    embed.add_argument("--out", required=True, help="output folder: embeddings-NNNNN.npy shards + manifest.json")
    embed.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="passages per encoder call, split over the local devices (default 64)",
    )
    embed.add_argument(
        "--shard-size", type=int, default=100_000, help="rows per shard file, the unit of resumption (default 100000)"
    )
    embed.add_argument(
        "--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="storage dtype (default float32)"
    )
    embed.add_argument("--max-length", type=int, default=256, help="passage tokens, padded and truncated (default 256)")
    embed.add_argument(
        "--input-mode", default="pair", choices=("pair", "text", "concat"),
        help="encoder input: (title, text) pair as DPR (default), text alone, or 'title text'",
    )  # fmt: skip
    embed.add_argument(
        "--pooling", default=None, choices=("cls", "mean", "mean_normalized"),
        help="override the checkpoint's pooling (DPR/BERT: cls; sentence-transformers: its own)",
    )  # fmt: skip
    embed.add_argument(
        "--format", default=None, choices=("tsv", "jsonl"), help="corpus format (default: from the file name)"
    )
    embed.add_argument(
        "--strict", action="store_true", help="fail on the first malformed corpus line instead of skipping it"
    )
    embed.add_argument("--process-index", type=int, default=None,
                       help="this job's part when P independent jobs share the embedding (shards i, i+P, ...)")
    embed.add_argument("--process-count", type=int, default=None,
                       help="P, the jobs sharing it (default: the processes of a jax.distributed run, else 1)")
    embed.set_defaults(handler=_embed)

    split = sub.add_parser("split-corpus", help="split documents (JSONL, or .txt files) into DPR-style passages "
                           "of N words with stable ids, as a TSV for `rag-jax embed`")  # fmt: skip
    split.add_argument("--documents", required=True, help='a JSONL file ({"text", "title", "id"} per line), a .txt '
                       "file or a folder of .txt files (one document each)")  # fmt: skip
    split.add_argument("--out", required=True, help="the passages TSV to write (id, text, title)")
    split.add_argument("--words", type=int, default=100, help="words per passage (default 100, as DPR)")
    split.add_argument("--strict", action="store_true", help="fail on the first malformed line instead of skipping it")
    split.set_defaults(handler=_split_corpus)

    build = sub.add_parser(
        "build-index", help="build a MIPS index (ScaNN or exact) over an embedding folder and save it"
    )
    build.add_argument("--embeddings", required=True, help="folder written by `rag-jax embed`")
    build.add_argument("--out", required=True, help="output folder for the index")
    build.add_argument(
        "--kind", default="scann", choices=INDEX_KINDS, help="scann (host, approximate; default) or exact (on device)"
    )
    build.add_argument(
        "--shards", type=int, default=1, help="split the rows into N independently built shards (default 1)"
    )
    build.add_argument("--passages", default=None, help="the corpus file, to check the embeddings were made from it")
    build.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16"), help="exact: storage dtype (default float32)"
    )
    build.add_argument("--num-leaves", type=int, default=None, help="scann: tree leaves (default sqrt(N))")
    build.add_argument(
        "--leaves-to-search", type=int, default=None,
        help="scann: leaves searched per query (default: the fewest reaching --target-recall)",
    )  # fmt: skip
    build.add_argument(
        "--target-recall", type=float, default=None,
        help="scann: recall@10 against exact search the search settings are tuned to, on sampled rows plus noise "
             "(default 0.95; lower is faster)",
    )  # fmt: skip
    build.add_argument(
        "--reorder-factor",
        type=int,
        default=None,
        help="scann: exact rescoring of reorder_factor * k candidates (default 10)",
    )
    build.add_argument(
        "--reorder-dtype",
        default=None,
        choices=("float32", "int8"),
        help="scann: rescoring copy of the rows, float32 (exact scores, 4 bytes/dim; default) or int8 (1 byte/dim)",
    )
    build.set_defaults(handler=_build_index)

    update = sub.add_parser("update-index", help="add, replace and delete passages of a corpus (passages, embeddings, "
                            "index) without embedding it again or retraining the index")  # fmt: skip
    update.add_argument("--passages", required=True, help="the corpus file (TSV or JSONL) the embeddings were made from")
    update.add_argument("--embeddings", required=True, help="its embedding folder (written by `rag-jax embed`)")
    update.add_argument("--index", required=True, help="the index folder built over them (`rag-jax build-index`)")
    update.add_argument("--updates", required=True, help='JSONL, one update a line: {"op": "add"|"replace", "id", '
                        '"title", "text"} or {"op": "delete", "id"}')  # fmt: skip
    update.add_argument("--encoder", required=True, help="the passage encoder folder the embeddings were made with")
    update.add_argument("--out", required=True, help="a new folder for the updated corpus: passages.tsv|jsonl, "
                        "embeddings/, index/")  # fmt: skip
    update.add_argument("--batch-size", type=int, default=64, help="passages per encoder call (default 64)")
    update.add_argument("--max-length", type=int, default=256, help="passage tokens, as given to `rag-jax embed` "
                        "(default 256)")  # fmt: skip
    update.add_argument("--pooling", default=None, choices=("cls", "mean", "mean_normalized"),
                        help="the pooling given to `rag-jax embed`, if any")  # fmt: skip
    update.set_defaults(handler=_update_index)
