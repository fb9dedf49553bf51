"""``rag-jax embed`` (encode every passage of a corpus into embedding shards, resumably) and
``rag-jax build-index`` (build a ScaNN or exact MIPS index over them and save it).

``embed`` wraps ``rag_jax.retrieval.embed_passages``: a progress bar with throughput and ETA; a
re-run with the same arguments skips the complete shards and gives the same bytes as one
uninterrupted run; other settings in an existing folder are refused. The encoder folder holds the
model (DPR context encoder, BertModel or sentence-transformers) and its tokenizer.
"""

from __future__ import annotations

import argparse
import os
import time

from rag_jax.errors import ConfigError, named_by

INDEX_KINDS = ("scann", "exact")
SCANN_OPTIONS = ("num_leaves", "leaves_to_search", "reorder_factor", "reorder_dtype")


def _folder_size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def _embed(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from rag_jax.hf.encoder import load_encoder
    from rag_jax.retrieval import PassageStore, embed_passages, hf_tokenize_fn

    with named_by("--passages"):  # before the encoder loads, so a corpus mistake shows at once
        store = PassageStore.open(args.passages, format=args.format, strict=args.strict, progress=True)
    with store:
        encoder = load_encoder(args.encoder, pooling=args.pooling)
        tokenizer = AutoTokenizer.from_pretrained(args.encoder)
        start = time.perf_counter()
        manifest = embed_passages(
            store, encoder.encode, hf_tokenize_fn(tokenizer, args.max_length), args.out,
            batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype, input_mode=args.input_mode,
            encoder_name=os.path.abspath(args.encoder),
        )  # fmt: skip
    seconds = time.perf_counter() - start
    state = "complete" if manifest["complete"] else "INCOMPLETE"
    print(f"embedded {manifest['num_passages']} passages -> [{manifest['num_passages']}, {manifest['dim']}] "
          f"{manifest['dtype']} in {manifest['num_shards']} shard(s), {state}; {seconds:.1f} s this run; "
          f"{args.out} ({_mib(_folder_size(args.out))})")  # fmt: skip
    return 0 if manifest["complete"] else 1


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
          f"saved to {args.out} ({_mib(_folder_size(args.out))})")  # fmt: skip
    return 0


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
    embed.set_defaults(handler=_embed)

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
        "--leaves-to-search", type=int, default=None, help="scann: leaves searched per query (default 10%%)"
    )
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
