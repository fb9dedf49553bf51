"""Compile time of BART-large-sized generator programs against the number of layers, on abstract weights.

Two programs, each traced and lowered (``jax.jit(...).lower``) and compiled by XLA (``.compile()``),
never run, with ``jax.ShapeDtypeStruct`` weights from ``nnx.eval_shape`` (nothing model-sized is
allocated), float32:

* ``train``: forward + backward of the RAG-Token loss through ``rag.per_doc_logits`` (the generator
  ``jax.vmap``-ed over the documents, dropout on), B questions x K documents, source length S,
  target length T; gradients for every generator weight (passed as the ``Trainer`` passes them, a
  plain dict).
* ``decode``: RAG-Token greedy search, ``decoding.rag_token_search`` (encoder once, then the
  ``lax.while_loop`` over tokens with the KV cache), same B, K, S, ``max_length`` T.
* ``decode_cpu``: the same search on the model decoding runs on CPU (``Generator.decode_split``: the
  decoder's layers unstacked, a Python loop in the token loop, so this one grows with depth).

The generator is BART-large (d_model 1024, 16 heads, FFN 4096, vocab 50265) with ``--layers`` encoder
and as many decoder layers. Prints a markdown table: seconds to trace + lower, seconds for XLA to
compile (the fastest of ``--repeats`` runs), and the size of the lowered StableHLO text. Timings depend
on the machine and its load.

    PYTHONPATH=. python experiments/bench/compile_time.py --layers 2 12
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from rag_jax.models.bart import Bart
from rag_jax.models.configs import BartConfig
from rag_jax.models.remat import REMAT_POLICIES
from rag_jax.rag import objective
from rag_jax.rag.decoding import SearchOptions, rag_token_search
from rag_jax.rag.model import per_doc_logits


def _abstract_generator(layers: int, remat: str, stacked_decoder: bool = True):
    cfg = BartConfig(encoder_layers=layers, decoder_layers=layers)
    model = nnx.eval_shape(lambda: Bart(cfg, rngs=nnx.Rngs(0), remat=remat, stacked_decoder=stacked_decoder))
    return cfg, nnx.split(model)


def _int32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def _float32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def lower_train(layers: int, b: int, k: int, s: int, t: int, remat: str):
    cfg, (graphdef, state) = _abstract_generator(layers, remat)

    def loss(weights, ids_BxKxS, mask_BxKxS, labels_BxT, doc_scores_BxK, key):
        logits_BxKxTxV = per_doc_logits(graphdef, weights, ids_BxKxS, mask_BxKxS, labels_BxT, dropout_key=key)
        return objective.rag_token_loss(
            logits_BxKxTxV, doc_scores_BxK, labels_BxT, pad_token_id=cfg.pad_token_id, reduce=True
        )

    key = jax.eval_shape(lambda: jax.random.key(0))
    weights = nnx.to_pure_dict(state)  # as the Trainer passes them
    args = (weights, _int32(b, k, s), _int32(b, k, s), _int32(b, t), _float32(b, k), key)
    return jax.jit(jax.value_and_grad(loss)).lower(*args)


def lower_decode(layers: int, b: int, k: int, s: int, t: int, remat: str, stacked_decoder: bool = True):
    _, (graphdef, state) = _abstract_generator(layers, remat, stacked_decoder)
    options = SearchOptions(max_length=t)
    return rag_token_search.lower(graphdef, state, _int32(b, k, s), _int32(b, k, s), _float32(b, k), options)


def lower_decode_cpu(layers: int, b: int, k: int, s: int, t: int, remat: str):
    return lower_decode(layers, b, k, s, t, remat, stacked_decoder=False)


PROGRAMS = {"train": lower_train, "decode": lower_decode, "decode_cpu": lower_decode_cpu}


def measure(program: str, layers: int, repeats: int, **shape) -> dict:
    """Seconds to trace + lower and to compile (each the minimum over ``repeats`` fresh runs), and the
    size of the StableHLO text."""
    lower_s, compile_s = [], []
    for _ in range(repeats):
        jax.clear_caches()
        start = time.perf_counter()
        lowered = PROGRAMS[program](layers, **shape)
        lowered_at = time.perf_counter()
        lowered.compile()
        lower_s.append(lowered_at - start)
        compile_s.append(time.perf_counter() - lowered_at)
    return {"lower_s": min(lower_s), "compile_s": min(compile_s), "hlo_kib": len(lowered.as_text()) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[12], help="encoder (= decoder) layer counts")
    parser.add_argument("--programs", nargs="+", choices=sorted(PROGRAMS), default=list(PROGRAMS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--docs", type=int, default=5)
    parser.add_argument("--source-len", type=int, default=128)
    parser.add_argument("--target-len", type=int, default=25)
    parser.add_argument("--remat", nargs="?", const="full", default="none", choices=REMAT_POLICIES,
                        help="the generator's remat policy (no value: full)")
    parser.add_argument("--repeats", type=int, default=1, help="report the fastest of this many runs")
    args = parser.parse_args()
    shape = {"b": args.batch, "k": args.docs, "s": args.source_len, "t": args.target_len, "remat": args.remat}

    print(f"BART-large-sized generator, B={args.batch} x K={args.docs} docs, S={args.source_len}, "
          f"T={args.target_len}, remat={args.remat}, {jax.devices()[0].platform}\n")  # fmt: skip
    print("| program | layers (enc+dec) | trace + lower (s) | XLA compile (s) | StableHLO (KiB) |")
    print("|---|---|---|---|---|")
    for program in args.programs:
        for layers in args.layers:
            r = measure(program, layers, args.repeats, **shape)
            print(f"| {program} | {layers}+{layers} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['hlo_kib']:.0f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
