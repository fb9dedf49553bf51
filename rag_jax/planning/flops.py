"""FLOP counts: the model FLOPs of a step computed from the architecture (what MFU is measured
against), and the matmul FLOPs of a traced program (what the compiled step executes, remat recompute
included).

Model FLOPs count matmuls only (2 per multiply-add), as MFU conventionally does: the projections, the
attention products ``Q K^T`` and ``P V`` over the unpadded-to lengths the program runs (S context
tokens, T target tokens, Q question tokens), the vocabulary projection, ``q . d``; a training step is
3x the forward (forward, and a backward of twice its cost), without remat's recomputation.

``traced_matmul_flops`` walks a jaxpr: every ``dot_general`` counts ``2 x prod(output) x prod(contracted
dims)``, cuDNN's fused attention its products (``FUSED_ATTENTION_MATMULS``), a ``scan`` body counts ``length`` times, a ``shard_map`` body once per device of its mesh, a
``while`` body ``while_trips`` times (a bound given by the caller: decoding loops stop early), a
``cond`` its costliest branch. XLA's own ``cost_analysis()`` counts a loop body once, however many times
it runs, so it undercounts scanned layers by their number; this count does not.
"""

from __future__ import annotations

import math

from jax.extend import core as jex_core

from rag_jax.models.configs import BartConfig, BertConfig


def _layer(d: int, ffn: int, tokens: int, attended: int) -> float:
    """A transformer layer's forward matmuls for ``tokens`` queries over ``attended`` keys each:
    q/k/v/out projections, the FFN, ``Q K^T`` and ``P V``."""
    return 2 * tokens * (4 * d * d + 2 * d * ffn) + 2 * 2 * tokens * attended * d


def bert_forward(cfg: BertConfig, sequences: int, length: int) -> float:
    flops = cfg.num_hidden_layers * _layer(cfg.hidden_size, cfg.intermediate_size, sequences * length, length)
    if cfg.projection_dim > 0:
        flops += 2 * sequences * cfg.hidden_size * cfg.projection_dim
    return flops


def bart_encoder_forward(cfg: BartConfig, sequences: int, length: int) -> float:
    return cfg.encoder_layers * _layer(cfg.d_model, cfg.encoder_ffn_dim, sequences * length, length)


def bart_decoder_forward(cfg: BartConfig, sequences: int, target: int, source: int, attended: float | None = None,
                         encoder_rows: int | None = None) -> float:
    """Decoder matmuls for ``sequences`` x ``target`` tokens over ``source`` encoder tokens, with the LM
    head; cross keys/values are projected once per encoder row (``encoder_rows``, default one per
    sequence; beams share their row's); ``attended`` is the mean number of self-attention keys per
    token (``target`` in training; the growing cache when decoding)."""
    d, tokens = cfg.d_model, sequences * target
    attended = target if attended is None else attended
    encoder_rows = sequences if encoder_rows is None else encoder_rows
    self_attn = 2 * tokens * 4 * d * d + 4 * tokens * attended * d
    cross = 2 * tokens * 2 * d * d + 2 * encoder_rows * source * 2 * d * d + 4 * tokens * source * d
    ffn = 2 * tokens * 2 * d * cfg.decoder_ffn_dim
    return cfg.decoder_layers * (self_attn + cross + ffn) + 2 * tokens * d * cfg.vocab_size


def rag_train_step(bert: BertConfig, bart: BartConfig, *, batch: int, k: int, question: int, source: int,
                   target: int, dense: bool = True) -> float:
    """Model FLOPs of one RAG training step over the global batch (forward + backward = 3x forward)."""
    forward = bart_encoder_forward(bart, batch * k, source) + bart_decoder_forward(bart, batch * k, target, source)
    if dense:
        forward += bert_forward(bert, batch, question) + 2 * batch * k * bert.output_dim
    return 3 * forward


def rag_decode(bart: BartConfig, *, batch: int, k: int, source: int, length: int, beams: int,
               rescore: bool = False) -> float:
    """Model FLOPs of decoding ``length`` tokens with ``beams`` beams for every (question, document)
    row (RAG-Token marginalises the rows per token, RAG-Sequence searches each document alone), plus,
    with ``rescore``, RAG-Sequence's thorough rescoring of the ``k x beams`` candidates against all k
    documents (one teacher-forced decoder pass each)."""
    rows = batch * k
    flops = bart_encoder_forward(bart, rows, source)
    flops += bart_decoder_forward(bart, rows * beams, length, source, attended=(length + 1) / 2, encoder_rows=rows)
    if rescore:  # every candidate against every document: the documents' cross keys/values are reused
        flops += bart_decoder_forward(bart, rows * k * beams, length, source, encoder_rows=0)
    return flops


FUSED_ATTENTION_MATMULS = {"dot_product_attention_fwd_wrapper": 2, "dot_product_attention_bwd_wrapper": 5}
"""Matmuls of size [T, S] x H per head in cuDNN's fused attention: q.k and p.v forward; the backward
recomputes q.k and takes four products for the gradients."""


def traced_matmul_flops(jaxpr, while_trips: int = 1) -> float:
    """Matmul FLOPs of a (closed) jaxpr, loops counted as they run (module docstring)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contract)
        elif name in FUSED_ATTENTION_MATMULS:  # cuDNN flash attention (layout [B, T, N, H])
            (b, t, n, h), s = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape[1]
            total += 2 * FUSED_ATTENTION_MATMULS[name] * b * n * t * s * h
        elif name == "scan":
            total += eqn.params["length"] * traced_matmul_flops(eqn.params["jaxpr"], while_trips)
        elif name == "while":
            body = traced_matmul_flops(eqn.params["body_jaxpr"], while_trips)
            total += while_trips * body + traced_matmul_flops(eqn.params["cond_jaxpr"], while_trips)
        elif name == "cond":
            total += max(traced_matmul_flops(b, while_trips) for b in eqn.params["branches"])
        elif name == "shard_map":
            total += eqn.params["mesh"].size * traced_matmul_flops(eqn.params["jaxpr"], while_trips)
        else:
            total += sum(traced_matmul_flops(j, while_trips) for j in _sub_jaxprs(eqn.params))
    return total


def _sub_jaxprs(params: dict):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
                yield v
