"""``rag-jax info PATH`` and ``rag-jax convert PATH OUT``: strict load of a transformers folder
(RAG, BART, DPR/BERT or sentence-transformers); describe it, or export it again with ``save_hf``
(a strict-key check and round trip of any supported checkpoint)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np


def load_any(path: str):
    """A RagModel, Generator or Encoder, by the folder's config."""
    from rag_jax.hf.encoder import load_encoder
    from rag_jax.hf.generator import load_generator
    from rag_jax.hf.io import read_config
    from rag_jax.hf.rag import load_rag

    model_type = "bert" if _is_sentence_transformers(path) else read_config(path).get("model_type")
    if model_type == "rag":
        return load_rag(path)
    if model_type in ("bart", "mbart"):
        return load_generator(path)
    return load_encoder(path)


def _is_sentence_transformers(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "modules.json"))


def _count(tree) -> int:
    import jax

    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def describe(obj) -> dict:
    """A JSON-able summary of a loaded Encoder, Generator or RagModel."""
    from flax import nnx

    from rag_jax.models.encoder import Encoder
    from rag_jax.models.generator import Generator
    from rag_jax.rag.model import RagModel

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


def _info(args: argparse.Namespace) -> int:
    json.dump(describe(load_any(args.path)), sys.stdout, indent=2)
    print()
    return 0


def _convert(args: argparse.Namespace) -> int:
    from rag_jax.hf.rag import save_hf

    save_hf(load_any(args.path), args.out)
    print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    info = sub.add_parser("info", help="load a transformers folder strictly and describe it")
    info.add_argument("path")
    info.set_defaults(handler=_info)
    convert = sub.add_parser("convert", help="load a transformers folder and export it again (round trip)")
    convert.add_argument("path")
    convert.add_argument("out")
    convert.set_defaults(handler=_convert)
