"""The ``rag-jax`` command (also ``python -m rag_jax``).

Subcommands so far:

* ``rag-jax info PATH``: load a transformers folder (RAG, BART, DPR/BERT or sentence-transformers)
  strictly and print what it is: kind, config, parameter count.
* ``rag-jax convert PATH OUT``: load it and export it again with ``save_hf`` (a strict-key check
  and round trip of any supported checkpoint).

``train``, ``eval``, ``embed``, ``build-index``, ``export`` and ``quickstart`` come with the trainer
and quickstart issues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import numpy as np

from rag_jax.convert.common import read_config


def _load(path: str):
    from rag_jax import load_encoder, load_generator, load_rag

    model_type = read_config(path).get("model_type") if not _is_sentence_transformers(path) else "bert"
    if model_type == "rag":
        return load_rag(path)
    if model_type in ("bart", "mbart"):
        return load_generator(path)
    return load_encoder(path)


def _is_sentence_transformers(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "modules.json"))


def _count(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def describe(obj) -> dict:
    """A JSON-able summary of a loaded Encoder, Generator or RagModel."""
    from flax import nnx

    from rag_jax import Encoder, Generator, RagModel

    if isinstance(obj, Encoder):
        return {"type": "Encoder", "kind": obj.kind, "pooling": obj.pooling, "dim": obj.dim,
                "parameters": _count(obj.params), "config": dataclasses.asdict(obj.config)}  # fmt: skip
    if isinstance(obj, Generator):
        return {"type": "Generator", "parameters": _count(nnx.state(obj.model, nnx.Param)),
                "config": dataclasses.asdict(obj.config)}  # fmt: skip
    if isinstance(obj, RagModel):
        return {"type": "RagModel", "variant": obj.variant, "rag": dataclasses.asdict(obj.config),
                "question_encoder": describe(obj.question_encoder), "generator": describe(obj.generator)}  # fmt: skip
    raise TypeError(type(obj).__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rag-jax", description="Retrieval-Augmented Generation in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="load a transformers folder strictly and describe it")
    info.add_argument("path")
    convert = sub.add_parser("convert", help="load a transformers folder and export it again (round trip)")
    convert.add_argument("path")
    convert.add_argument("out")
    args = parser.parse_args(argv)

    obj = _load(args.path)
    if args.command == "info":
        json.dump(describe(obj), sys.stdout, indent=2)
        print()
    else:
        from rag_jax import save_hf

        save_hf(obj, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
