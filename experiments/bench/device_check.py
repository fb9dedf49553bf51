"""The device check: three measurements for the day an accelerator is lent, run by ``device_check.sh``.

Each part runs in its own process (``device_check.sh`` gives it a time budget and carries on when it
fails) and writes its rows to a JSON file as it goes, so a part killed at its budget keeps the rows
it finished; ``table`` turns the parts' files into one markdown table.

* ``train``: the paper-size RAG-Token training step (``experiments/configs/paper.py:nq-token``: DPR
  BERT-base question encoder, BART-large generator, bfloat16 compute, k = 5, contexts 300 tokens,
  targets 25, questions 64) with a per-device batch that fits one GPU (``--batch``, default 32) and
  remat on, on randomly initialised parameters (no weights) and a synthetic ``DenseRagBatch``
  (``train_step.make_batch``): the compile, warmup steps, then timed steps (``jax.block_until_ready``
  each); MFU = the analytic model FLOPs (``rag_jax.planning.flops.rag_train_step``) / (median step time
  x devices x the chip's datasheet bf16 peak from ``rag_jax.planning.targets.attached_target()``), and
  beside it the plan's estimate for the same program on the same devices
  (``analysis.analyse(programs.train_step(config, target, programs.abstract_rag_model(config)), target)``);
  also against a measured bf16 matmul (8192^3 ``jnp.dot``).
* ``decode``: RAG-Token generation with a BART-large-shaped generator, rag_jax ``RagModel.generate``
  against ``transformers.RagTokenForGeneration.generate`` (torch on the same device), float32 on both
  sides (``jax_default_matmul_precision=highest``, torch's "highest"), the same random weights (built
  with transformers, saved, loaded with ``load_rag``: ``generate.py``'s helpers), 8 questions x 5
  documents of up to 300 tokens, greedy and 4 beams, ``max_length = min_length = 25``: tokens/s of
  both, the ratio, the outputs compared.
* ``index``: ``ExactIndex`` queries/s over a bfloat16 corpus of DPR's 21,015,300 x 768 (or the largest
  that fits in half the device memory) generated on the device (``exact.abstract_search``'s layout and
  program), query batch 1024, k = 5: the compiled search on device queries, and
  ``ExactIndex.search`` from host queries; the queries are corpus rows, so the top-1 must be the row.

``--tiny`` shrinks every shape (the tiny / small sizes of ``train_step.py`` and ``generate.py``, a
100k-row index) so the whole check runs on a CPU in a few minutes. Run the parts through
``device_check.sh``; by hand: ``python experiments/bench/device_check.py train --tiny --result t.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PAPER_CONFIG = os.path.join(REPO, "experiments", "configs", "paper.py") + ":nq-token"
PARTS = {
    "train": "1 paper-size train step",
    "decode": "2 BART-large RAG-Token decoding",
    "index": "3 ExactIndex search",
}
COLUMNS = ("check", "rag_jax", "compared with", "ratio", "details")


# ------------------------------------------------------------------------------------------------
# A part's result file


class Result:
    """A part's rows and facts, written to ``path`` (atomically) after every change."""

    def __init__(self, path: str, part: str):
        self.path = path
        self.data = {"part": part, "rows": [], "facts": {}}
        self.save()

    def fact(self, **facts) -> None:
        self.data["facts"].update(facts)
        self.save()

    def row(self, check: str, rag_jax: str, compared: str = "-", ratio: str = "-", details: str = "") -> None:
        self.data["rows"].append(dict(zip(COLUMNS, (check, rag_jax, compared, ratio, details))))
        print(f"ROW | {check} | {rag_jax} | {compared} | {ratio} | {details}", flush=True)
        self.save()

    def save(self) -> None:
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1)
        os.replace(self.path + ".tmp", self.path)


class Deadline:
    def __init__(self, epoch: float | None):
        self.epoch = epoch

    def left(self) -> float:
        return float("inf") if self.epoch is None else self.epoch - time.time()


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{format(x, spec)}{suffix}"


def si(x: float, unit: str) -> str:
    """``x`` with a metric prefix: ``si(3.2e12, "FLOP/s")`` -> ``"3.2 TFLOP/s"``."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.1f} {prefix}{unit}"
    return f"{x:.1f} {unit}"


def size_of(nbytes: float | None) -> str:
    """Bytes in GiB (MiB under one GiB); "-" for None."""
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def devices_line() -> str:
    import jax

    devices = jax.devices()
    return f"jax {jax.__version__}, backend {jax.default_backend()}: {len(devices)} x {devices[0].device_kind}"


def require_accelerator(args) -> None:
    """Full-size parts on a CPU would only run into their budgets: stop with the reason instead."""
    import jax

    if not args.tiny and jax.default_backend() == "cpu":
        raise SystemExit("no accelerator: jax's backend is cpu (the full-size check needs a GPU or TPU; --tiny runs on CPU)")


def bench_module(name: str):
    """``train_step`` / ``generate`` from this folder (the benchmarks whose helpers this check reuses)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return __import__(name)


# ------------------------------------------------------------------------------------------------
# 1. The paper-size training step against the plan


def tiny_model_overrides(folder: str) -> list[str]:
    """Config overrides for ``train_step.py``'s tiny shapes: config.json folders the planning reads."""
    import transformers

    size = bench_module("train_step").SIZES["tiny"]
    paths = {"question_encoder": os.path.join(folder, "question_encoder"), "generator": os.path.join(folder, "generator")}
    transformers.DPRConfig(**size.question_encoder).save_pretrained(paths["question_encoder"])
    transformers.BartConfig(**size.generator).save_pretrained(paths["generator"])
    return [
        f"config.model.question_encoder={paths['question_encoder']}",
        f"config.model.generator={paths['generator']}",
        "config.data.max_question_length=16",
        "config.rag.max_combined_length=64",
        "config.data.max_target_length=16",
    ]


def random_rag_model(config, seed: int = 0):
    """``planning.programs.abstract_rag_model(config)`` with concrete random parameters."""
    import jax
    from flax import nnx

    from rag_jax.config import resolve
    from rag_jax.models import bert
    from rag_jax.models.bart import Bart
    from rag_jax.models.encoder import Encoder
    from rag_jax.models.generator import Generator
    from rag_jax.planning.architectures import model_architectures
    from rag_jax.rag.model import RagModel

    encoder_cfg, generator_cfg = model_architectures(config)
    encoder = Encoder(bert.init_params(encoder_cfg, jax.random.key(seed)), encoder_cfg, pooling="cls", kind="dpr_question")
    generator = Generator(Bart(generator_cfg, rngs=nnx.Rngs(seed)), generator_cfg)
    variant = "token" if config.rag.variant == "closed_book" else config.rag.variant
    return RagModel(encoder, generator, resolve(config).rag, variant)


def matmul_peak(n: int, reps: int = 10) -> float:
    """Measured bf16 FLOP/s of a jitted ``jnp.dot`` (n x n x n), ``reps`` calls back to back."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    start = time.perf_counter()
    out = [dot(a, a) for _ in range(reps)]
    jax.block_until_ready(out)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def time_steps(trainer, batch, warmup: int, steps: int, deadline: Deadline) -> tuple[float, list[float], dict]:
    """The first step's seconds (trace + compile + step), the seconds of each timed step after
    ``warmup`` untimed ones (each step ``jax.block_until_ready``; fewer when the deadline is near),
    and the last step's metrics."""
    import jax

    state = trainer.init_state()
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(trainer.train_step(state, batch))
    first_s = time.perf_counter() - start
    print(f"first step (trace + compile + step) {first_s:.1f} s, loss {float(metrics['loss']):.3f}", flush=True)
    for _ in range(warmup):
        state, metrics = jax.block_until_ready(trainer.train_step(state, batch))
    seconds = []
    while len(seconds) < steps and (len(seconds) < 2 or deadline.left() > 60):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(trainer.train_step(state, batch))
        seconds.append(time.perf_counter() - start)
    return first_s, seconds, jax.device_get(metrics)


def part_train(args, res: Result, deadline: Deadline) -> None:
    import jax

    train_bench = bench_module("train_step")
    # train_step.py sets "highest" for its float32 comparison; the paper's step computes in bfloat16 at
    # the default precision, as `rag-jax train` runs it
    jax.config.update("jax_default_matmul_precision", None)
    if args.cache_dir:  # the plan's compile of the same program may then be a cache hit
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from rag_jax.config import load_config, resolve
    from rag_jax.planning import analysis, flops, programs, targets
    from rag_jax.training import sharding
    from rag_jax.training.step import Trainer

    res.fact(devices=devices_line())
    require_accelerator(args)
    target = targets.attached_target()
    chip = target.chip
    n_dev = target.num_devices
    res.fact(chip=f"{chip.name} (datasheet bf16 peak {fmt(chip.peak_flops and chip.peak_flops / 1e12, '.0f', ' TFLOP/s')}, "
                  f"{chip.source})")  # fmt: skip
    peak_measured = matmul_peak(1024 if args.tiny else 8192)
    print(f"measured bf16 matmul: {si(peak_measured, 'FLOP/s')}", flush=True)

    folder = tempfile.mkdtemp()  # --tiny: the config.json folders, read by the model and the plan
    overrides = tiny_model_overrides(folder) if args.tiny else []
    batch_size = args.batch or (2 if args.tiny else 32) * n_dev
    overrides += [f"config.train.batch_size={batch_size}", "config.train.remat=true", "config.train.grad_accum_steps=1"]
    config = load_config(PAPER_CONFIG, overrides)
    settings = resolve(config)
    model = random_rag_model(config)
    b, k = config.train.batch_size, config.rag.k
    q, s, t = config.data.max_question_length, config.rag.max_combined_length, config.data.max_target_length
    bert_cfg, bart_cfg = model.question_encoder.config, model.generator.config
    model_flops = flops.rag_train_step(bert_cfg, bart_cfg, batch=b, k=k, question=q, source=s, target=t)
    setting = (f"nq-token, B={b} ({b // n_dev}/device), K={k}, S={s}, T={t}, Q={q}, "
               f"{settings.train.compute_dtype}, remat={settings.train.remat}")  # fmt: skip
    trainer = Trainer(model, settings.train, sharding.make_mesh(settings.mesh, devices=target.devices))
    size = train_bench.Size(
        question_encoder={"vocab_size": bert_cfg.vocab_size, "hidden_size": model.question_encoder.dim},
        generator={"vocab_size": bart_cfg.vocab_size}, batch=b, n_docs=k, question_len=q, context_len=s, target_len=t,
    )  # fmt: skip
    batch = train_bench.make_batch(size)
    n_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state().params))
    first_s, seconds, metrics = time_steps(trainer, batch, args.warmup, args.steps, deadline)
    del trainer  # its state is gone with time_steps: the device memory is free for the plan
    step_s = statistics.median(seconds)
    loss = float(metrics["loss"])
    stats = jax.devices()[0].memory_stats() or {}
    peak_mem = stats.get("peak_bytes_in_use")
    mfu = model_flops / (step_s * n_dev * chip.peak_flops) if chip.peak_flops else None
    mfu_measured = model_flops / (step_s * n_dev * peak_measured)
    res.fact(train_step_s=step_s, mfu=mfu)
    res.row(
        "1 train step: measured",
        f"{step_s:.4f} s/step, **MFU {fmt(mfu and 100 * mfu, '.1f', '%')}**",
        "-", "-",
        f"{setting}; {n_params / 1e6:.1f}M parameters; {b / step_s:.1f} examples/s; model FLOPs "
        f"{model_flops:.3e}/step (`planning.flops.rag_train_step`); {si(model_flops / step_s / n_dev, 'FLOP/s')}"
        f"/device = {100 * mfu_measured:.1f}% of a measured bf16 matmul "
        f"({si(peak_measured, 'FLOP/s')}); median of {len(seconds)} timed steps after {args.warmup} "
        f"warmup (min {min(seconds):.4f}, max {max(seconds):.4f}); first step (trace + compile) {first_s:.1f} s; "
        f"loss {loss:.3f}; device peak memory {size_of(peak_mem)}",
    )
    del model
    if deadline.left() < (60 if not args.tiny else 20):
        res.row("1 train step: plan", "skipped: out of time", "", "", f"{deadline.left():.0f} s left")
        return
    abstract = programs.abstract_rag_model(config)
    program = programs.train_step(config, target, abstract)
    plan = analysis.analyse(program, target)
    ratio = f"measured / est {step_s / plan.est_step_s:.2f}x" if plan.est_step_s else "-"
    res.row(
        "1 train step: plan estimate",
        f"measured {step_s:.4f} s, MFU {fmt(mfu and 100 * mfu, '.1f', '%')}",
        f"est {fmt(plan.est_step_s, '.4f', ' s')}, est MFU {fmt(plan.est_mfu and 100 * plan.est_mfu, '.1f', '%')}",
        ratio,
        f"`analysis.analyse(programs.train_step(...))` on {target.topology} ({plan.device_kind}): est compute "
        f"{fmt(plan.est_compute_s, '.4f', ' s')}, est HBM {fmt(plan.est_memory_s, '.4f', ' s')}; HLO matmul FLOPs "
        f"{plan.hlo_flops_per_device:.3e}/device ({plan.hlo_flops_per_device * plan.num_devices / model_flops:.2f}x "
        f"the model FLOPs, remat included); plan memory {size_of(plan.bytes_per_device)}/device "
        f"(fits: {'yes' if plan.fits else 'NO'}) vs measured peak {size_of(peak_mem)}; "
        f"plan compile {plan.compile_s:.1f} s",
    )


# ------------------------------------------------------------------------------------------------
# 2. RAG-Token decoding against transformers


def part_decode(args, res: Result, deadline: Deadline) -> None:
    gen_bench = bench_module("generate")  # sets jax_default_matmul_precision=highest (float32 as torch)
    train_bench = bench_module("train_step")
    import jax
    import torch

    from rag_jax.hf.rag import load_rag

    res.fact(devices=devices_line())
    require_accelerator(args)
    if args.tiny:  # generate.py's small size, fewer questions and tokens
        size = dataclasses.replace(gen_bench.SIZES["small"], batch=4, max_length=12, warmup=0)
    else:
        size = gen_bench.Size(
            generator={  # BART-large
                "vocab_size": 50265, "d_model": 1024, "encoder_layers": 12, "decoder_layers": 12,
                "encoder_attention_heads": 16, "decoder_attention_heads": 16, "encoder_ffn_dim": 4096,
                "decoder_ffn_dim": 4096, "max_position_embeddings": 1024,
            },
            batch=8, n_docs=5, context_len=300, max_length=25, warmup=1,
        )  # fmt: skip
    on_gpu = jax.default_backend() == "gpu"
    device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    torch.set_float32_matmul_precision("highest")  # no TF32: float32 on both sides
    torch_device = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    res.fact(torch=f"torch {torch.__version__} on {torch_device}")
    g = size.generator
    setting = (f"BART d_model {g['d_model']}, {g['encoder_layers']}+{g['decoder_layers']} layers, vocab {g['vocab_size']}; "
               f"B={size.batch} x K={size.n_docs} docs, contexts <= {size.context_len} tokens, "
               f"max_length=min_length={size.max_length}, float32")  # fmt: skip
    start = time.perf_counter()
    with torch.device(device):
        model = gen_bench.torch_rag(size, "token")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        rag = load_rag(folder)
    print(f"models built and loaded in {time.perf_counter() - start:.1f} s (torch on {device})", flush=True)
    ids, mask, scores = gen_bench.contexts(size, seed=0)
    t_ids, t_mask, t_scores = (torch.tensor(x, device=device) for x in (ids, mask, scores))
    for beams in (1, 4):
        name = f"2 RAG-Token decode, {'greedy' if beams == 1 else f'{beams} beams'}"
        if deadline.left() < (40 if not args.tiny else 10):
            res.row(name, "skipped: out of time", "", "", f"{deadline.left():.0f} s left")
            continue
        kw = {"n_docs": size.n_docs, "num_beams": beams, "max_length": size.max_length, "min_length": size.max_length}

        def reference(kw=kw):
            with torch.no_grad():
                out = model.generate(context_input_ids=t_ids, context_attention_mask=t_mask, doc_scores=t_scores, **kw)
            return out.cpu().numpy()

        def ours(kw=kw):
            return rag.generate(ids, mask, scores, variant="token", **kw)

        ref_out, ref_first = timed(reference)
        our_out, our_first = timed(ours)
        print(f"[{name}] first calls: reference {ref_first:.1f} s, rag_jax (trace + compile) {our_first:.1f} s", flush=True)
        timing = train_bench.alternate({"reference": reference, "rag_jax": ours}, steps=args.calls,
                                       warmup=size.warmup, rounds=2, pause=0.0)  # fmt: skip
        ref_s, our_s = timing["reference"].median, timing["rag_jax"].median
        ref_tps = gen_bench.generated_tokens(ref_out) / ref_s
        our_tps = gen_bench.generated_tokens(our_out) / our_s
        res.row(
            name,
            f"**{our_tps:.0f} tok/s** ({our_s:.3f} s/call)",
            f"transformers {ref_tps:.0f} tok/s ({ref_s:.3f} s/call)",
            f"**{our_tps / ref_tps:.2f}x**",
            f"{setting}; outputs: {gen_bench.compare(our_out, ref_out)}; torch on {torch_device}; medians of "
            f"{len(timing['rag_jax'].seconds)} timed calls per side (2 alternating blocks, {size.warmup} warmup each); "
            f"first call: rag_jax {our_first:.1f} s (trace + compile), transformers {ref_first:.1f} s; tokens/call "
            f"{gen_bench.generated_tokens(our_out)} / {gen_bench.generated_tokens(ref_out)}",
        )


# ------------------------------------------------------------------------------------------------
# 3. ExactIndex at DPR's scale


def random_corpus(struct, chunk: int, seed: int = 0):
    """A standard-normal bfloat16 corpus of ``struct``'s shape and sharding, generated on its devices
    one ``chunk`` of rows at a time (nothing built on the host)."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import PartitionSpec as P

    from rag_jax.retrieval.index import exact

    mesh = struct.sharding.mesh
    rows, dim = struct.shape
    per_device = rows // mesh.size  # a multiple of chunk (exact.corpus_layout)

    def local(key_data):
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), lax.axis_index(exact.AXIS))

        def body(i, buf):
            block = jax.random.normal(jax.random.fold_in(key, i), (chunk, dim), jnp.bfloat16)
            return lax.dynamic_update_slice(buf, block, (i * chunk, 0))

        buf = lax.pcast(jnp.zeros((per_device, dim), jnp.bfloat16), (exact.AXIS,), to="varying")
        return lax.fori_loop(0, per_device // chunk, body, buf)

    generate = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(), out_specs=P(exact.AXIS, None)),
                       out_shardings=struct.sharding)  # fmt: skip
    return generate(jax.random.key_data(jax.random.key(seed)))


def part_index(args, res: Result, deadline: Deadline) -> None:
    import jax
    import numpy as np

    from rag_jax.planning.programs import PAPER_CORPUS_SIZE
    from rag_jax.planning.targets import attached_target
    from rag_jax.retrieval import ExactIndex
    from rag_jax.retrieval.index import exact

    res.fact(devices=devices_line())
    require_accelerator(args)
    devices = jax.devices()
    dim, k = 768, 5
    query_batch = 256 if args.tiny else 1024
    limit = min((d.memory_stats() or {}).get("bytes_limit", 0) for d in devices)
    size = 50_000 if args.tiny else PAPER_CORPUS_SIZE
    capped = ""
    if limit and not args.tiny and size * dim * 2 > 0.6 * limit * len(devices):
        size = int(0.6 * limit * len(devices) / (dim * 2)) // 1000 * 1000
        capped = f" (capped from {PAPER_CORPUS_SIZE:,} to 60% of the devices' {limit * len(devices) / 2**30:.0f} GiB)"
    search, q_struct, c_struct = exact.abstract_search(size, dim, k=k, query_batch=query_batch, dtype="bfloat16",
                                                       devices=devices)  # fmt: skip
    chunk, _ = exact.corpus_layout(size, len(devices), 32768)
    corpus, gen_s = timed(lambda: jax.block_until_ready(random_corpus(c_struct, chunk)))
    print(f"corpus {c_struct.shape} bfloat16 generated on device in {gen_s:.1f} s", flush=True)
    rows = np.random.default_rng(0).choice(size, query_batch, replace=False)
    queries = jax.device_put(np.asarray(corpus[rows]).astype(np.float32), q_struct.sharding)  # corpus rows
    (_, i), first_s = timed(lambda: jax.block_until_ready(search(queries, corpus)))
    top1 = float(np.mean(np.asarray(i)[:, 0] == rows))
    for _ in range(2):
        jax.block_until_ready(search(queries, corpus))
    seconds = []
    while len(seconds) < args.calls * 3 and (len(seconds) < 2 or deadline.left() > 15):
        seconds.append(timed(lambda: jax.block_until_ready(search(queries, corpus)))[1])
    batch_s = statistics.median(seconds)
    flop = 2.0 * query_batch * size * dim
    chip = attached_target().chip
    of_peak = f" = {100 * flop / batch_s / len(devices) / chip.peak_flops:.0f}% of the datasheet bf16 peak" if chip.peak_flops else ""
    setting = (f"{size:,} x {dim} bfloat16{capped} over {len(devices)} device(s), generated on device in {gen_s:.1f} s; "
               f"query batch {query_batch}, k={k}; queries = corpus rows")  # fmt: skip
    res.row(
        "3 ExactIndex search program (device queries)",
        f"**{query_batch / batch_s:,.0f} queries/s** ({1e3 * batch_s:.1f} ms/batch)",
        "-", "-",
        f"{setting}: top-1 is the query's own row for {100 * top1:.1f}%; {si(flop / batch_s, 'FLOP/s')}"
        f"{of_peak}, corpus read at {si(size * dim * 2 / batch_s, 'B/s')}; median of {len(seconds)} batches; "
        f"first call (compile + search) {first_s:.1f} s",
    )
    index = ExactIndex(corpus, size, chunk, c_struct.sharding.mesh, "bfloat16", 32768, None)
    host_queries = np.asarray(queries)
    ids, _ = index.search(host_queries, k, query_batch=query_batch)  # the same compiled program
    same = bool(np.array_equal(ids, np.asarray(i)))
    host_seconds = []
    while len(host_seconds) < args.calls and (not host_seconds or deadline.left() > 10):
        host_seconds.append(timed(lambda: index.search(host_queries, k, query_batch=query_batch))[1])
    host_s = statistics.median(host_seconds)
    res.row(
        "3 ExactIndex.search (host queries, ids to host)",
        f"**{query_batch / host_s:,.0f} queries/s** ({1e3 * host_s:.1f} ms/batch)",
        "-", "-",
        f"the same index and queries as numpy arrays; ids same as the program's: {same}; median of {len(host_seconds)} calls",
    )


# ------------------------------------------------------------------------------------------------
# The table


def error_line(log: str) -> str:
    """The most telling line of a failed part's output: its exception (or SystemExit message), else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^([\w.]+(Error|Exception|Exit)|no accelerator|Killed)\b", line)]
    line = (errors or lines or ["(no output)"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(args) -> str:
    work = args.results
    facts, rows = {}, []
    for part, title in PARTS.items():
        path = os.path.join(work, f"{part}.json")
        data = {"rows": [], "facts": {}}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        for key, value in data["facts"].items():
            facts.setdefault(key, value)
        rows += data["rows"]
        status_path = os.path.join(work, f"{part}.status")
        if not os.path.exists(status_path):
            rows.append(dict(zip(COLUMNS, (title, "**not run**", "", "", ""))))
            continue
        with open(status_path, encoding="utf-8") as f:
            status = f.read().split()
        if status[0] == "not":
            rows.append(dict(zip(COLUMNS, (title, "not run", "", "", " ".join(status[2:])))))
            continue
        if status[0] == "skipped":
            rows.append(dict(zip(COLUMNS, (title, "**skipped**", "", "", f"too little of the run's time left ({status[1]} s)"))))
            continue
        rc, seconds, budget = (int(x) for x in status[:3])
        log_path = os.path.join(work, f"{part}.log")
        log = ""
        if os.path.exists(log_path):
            with open(log_path, encoding="utf-8", errors="replace") as f:
                log = f.read()
        if rc in (124, 137):
            why = f"**timed out** at its {budget} s budget"
        elif rc:
            why = f"**failed** (exit {rc}): `{error_line(log)}`"
        else:
            why = ""
        if why:
            rows.append(dict(zip(COLUMNS, (title, why, "", "", f"after {seconds} s (the part's rows above it, if any, were finished before)"))))
    nvidia = args.nvidia_smi.strip() or "(nvidia-smi: none)"
    lines = [
        f"# Device check{' (--tiny)' if args.tiny else ''}",
        "",
        f"- nvidia-smi: {nvidia}",
        f"- {facts.get('devices', 'jax: no part reported its devices')}",
        f"- chip figures: {facts.get('chip', '-')}",
        f"- {facts.get('torch', 'torch: -')}",
        f"- total {args.total_s} s; command `bash experiments/bench/device_check.sh{' --tiny' if args.tiny else ''}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=[*PARTS, "table"])
    parser.add_argument("--tiny", action="store_true", help="small shapes (runs on a CPU)")
    parser.add_argument("--result", help="the part's JSON file")
    parser.add_argument("--deadline", type=float, default=None, help="epoch seconds by which the part should end")
    parser.add_argument("--batch", type=int, default=None, help="train: global batch (default 32 per device; tiny 2)")
    parser.add_argument("--warmup", type=int, default=2, help="train: untimed steps after the first")
    parser.add_argument("--steps", type=int, default=None, help="train: timed steps (default 10; tiny 5)")
    parser.add_argument("--calls", type=int, default=None, help="decode / index: timed calls per side (default 4; tiny 2)")
    parser.add_argument("--cache-dir", default=None, help="train: jax's persistent compilation cache")
    parser.add_argument("--results", help="table: the folder of the parts' files")
    parser.add_argument("--nvidia-smi", default="", help="table: the nvidia-smi line")
    parser.add_argument("--total-s", default="?", help="table: the whole check's seconds")
    parser.add_argument("--out", help="table: the markdown file")
    args = parser.parse_args(argv)
    args.steps = args.steps or (5 if args.tiny else 10)
    args.calls = args.calls or (2 if args.tiny else 4)
    if args.part == "table":
        text = table(args)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(text)
        return 0
    res = Result(args.result, args.part)
    {"train": part_train, "decode": part_decode, "index": part_index}[args.part](args, res, Deadline(args.deadline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
