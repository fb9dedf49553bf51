"""Generation benchmark: ``RagModel.generate`` against transformers' ``Rag{Token,Sequence}ForGeneration.generate``.

Both sides decode with the same randomly initialised model (built with transformers from a config,
saved, loaded into rag_jax with ``load_rag``), the same contexts ``[B*K, S]`` (document fastest), doc
scores ``[B, K]``, ``n_docs``, ``num_beams``, ``max_length`` and ``min_length = max_length`` (so every
returned sequence has the same number of tokens), float32, on CPU, in one process:

* reference: ``model.generate(context_input_ids=..., context_attention_mask=..., doc_scores=...,
  n_docs=K, num_beams=N, max_length=L, min_length=L)`` under ``torch.no_grad()``;
* rag_jax: ``rag.generate(...)`` with the same arguments (one jitted program: encoder once,
  ``lax.while_loop`` over tokens with the KV cache). RAG-Sequence "thorough" runs with
  ``mask_candidate_search=False``, the reference's own algorithm (its candidate search attends to
  context padding). RAG-Sequence "fast" (the paper's Fast Decoding; transformers has no such mode) is
  timed for rag_jax alone, with its default ``mask_candidate_search=True``, and set against the
  reference's thorough decoding.

The reference also runs with transformers' static KV cache (``cache_implementation="static"``) and
with the static cache plus ``torch.compile`` of the forward pass (generate's own auto-compilation,
which transformers enables off GPU only through ``CompileConfig._compile_all_devices``; the first
call compiles and is not timed), where RAG's generate supports them (transformers 5.23):

* RAG-Token greedy: ``RagTokenForGeneration.generate`` prepares the static cache itself, and the
  outputs are those of the dynamic cache;
* RAG-Sequence: its generate runs BART's ``generate`` per question, which takes the static cache;
* RAG-Token beam search: no static-cache peer. After the first step
  ``RagTokenForGeneration._reorder_cache`` rebuilds the cache from its tensors as a dynamic cache,
  the static cache's unfilled positions included, and every later step attends to them: the outputs
  differ from the dynamic cache's (all 8 rows of the small size, beams 4).

The figure is generated tokens per second: the tokens after the decoder start token (EOS included,
padding excluded) of the returned sequences, counted separately for each side, over the median wall
time of one ``generate`` call. The outputs of both sides are compared (identical ids, or how many rows
differ). Calls alternate between the sides in blocks (see ``train_step.alternate``): ``--rounds``
rounds, each block the size's untimed warmup calls and ``--calls`` timed calls; the median is over all
timed calls.

Threads: torch gets ``--threads`` (default: the cores this process may run on); XLA:CPU sizes its
thread pool from the process's CPU affinity (``XLA_FLAGS`` thread options do not restrict it here), so
the way to give both sides one core is ``taskset -c 0 ... --threads 1``. On a shared machine prefer
that: with 2 threads and other jobs running, torch's per-op thread barriers made the reference 25-40x
slower (measured at load ~4.5 on 2 cores), which says nothing about either implementation.

As the training-step benchmark, the script re-executes itself with huge pages for malloc (both sides;
``RAG_JAX_HUGE_PAGES=0`` for neither). Compilation is reported separately, from jax's monitoring events of rag_jax's first call (tracing,
lowering to MLIR, XLA compilation; jax's caches are cleared before every setting). Then a second
batch of the same shapes but other ids, other padding and other doc scores is generated: the number
of traces and compilations it triggers shows whether one compiled program serves the whole padded
shape bucket (0 expected).

    taskset -c 0 python experiments/bench/generate.py --threads 1 --out experiments/results/generate.md
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: no accelerator probes (libtpu in the dev set-up)

import jax
import numpy as np
import torch
import transformers

# the training-step benchmark in this folder (importing it sets float32 matmul precision)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import alternate, machine, matmul_peak, timed, wait_for_quiet_cpu

from rag_jax.commands import host_memory
from rag_jax.hf.rag import load_rag

PAD = 1
QUESTION_ENCODER = dict(  # unused by generate, but a RAG folder holds one
    vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64,
)  # fmt: skip

# jax.monitoring events (jax/_src/dispatch.py) of one jit cache miss: trace, lower, XLA compile
COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}


@dataclasses.dataclass(frozen=True)
class Size:
    generator: dict  # transformers BartConfig kwargs
    batch: int
    n_docs: int
    context_len: int
    max_length: int
    warmup: int  # untimed calls at the start of every block


SIZES = {
    "small": Size(
        generator=dict(
            vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=128,
        ),
        batch=8, n_docs=5, context_len=64, max_length=20, warmup=1,
    ),
    "base": Size(  # BART-base
        generator=dict(
            vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
            decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
        ),
        batch=1, n_docs=5, context_len=64, max_length=10, warmup=0,  # seconds per call: no warmup calls
    ),
}  # fmt: skip


def torch_rag(size: Size, variant: str, seed: int = 0):
    """A random transformers RAG model in eval mode (transformers' default initialisation)."""
    torch.manual_seed(seed)
    qe = transformers.DPRQuestionEncoder(transformers.DPRConfig(**QUESTION_ENCODER))
    gen = transformers.BartForConditionalGeneration(transformers.BartConfig(**size.generator))
    config = transformers.RagConfig.from_question_encoder_generator_configs(qe.config, gen.config, n_docs=size.n_docs)
    cls = transformers.RagTokenForGeneration if variant == "token" else transformers.RagSequenceForGeneration
    return cls(config, question_encoder=qe, generator=gen).eval()


def contexts(size: Size, seed: int):
    """Random right-padded contexts ``[B*K, S]`` (lengths between S/2 and S, the first document of
    every question unpadded so the padded shape is S), their mask and doc scores ``[B, K]``."""
    rng = np.random.default_rng(seed)
    b, k, s = size.batch, size.n_docs, size.context_len
    ids = rng.integers(3, size.generator["vocab_size"], size=(b, k, s))
    lengths = rng.integers(s // 2, s + 1, size=(b, k))
    lengths[:, 0] = s
    mask = (np.arange(s)[None, None, :] < lengths[:, :, None]).astype(np.int64)
    ids[mask == 0] = PAD
    return ids.reshape(b * k, s), mask.reshape(b * k, s), rng.normal(size=(b, k)).astype(np.float32)


def generated_tokens(ids: np.ndarray) -> int:
    """Tokens after the decoder start, EOS included, padding excluded."""
    return int(np.sum(ids[:, 1:] != PAD))


def compare(ours: np.ndarray, reference: np.ndarray) -> str:
    if ours.shape != reference.shape:
        return f"shapes differ: {ours.shape} vs {reference.shape}"
    differing = int(np.sum(np.any(ours != reference, axis=1)))
    return "identical" if differing == 0 else f"{differing}/{len(reference)} rows differ"


class CompileEvents:
    """Counts and seconds of jax's trace / lower / compile events while active (a monitoring listener)."""

    def __init__(self):
        self.count, self.seconds, self.active = collections.Counter(), collections.Counter(), False
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **kwargs) -> None:
        if self.active and event in COMPILE_EVENTS:
            self.count[COMPILE_EVENTS[event]] += 1
            self.seconds[COMPILE_EVENTS[event]] += duration

    def during(self, fn):
        """``fn()``'s result, wall seconds, and the events it triggered (count, seconds per kind)."""
        self.count.clear()
        self.seconds.clear()
        self.active, start = True, time.perf_counter()
        try:
            out = fn()
        finally:
            self.active = False
        return out, time.perf_counter() - start, dict(self.count), dict(self.seconds)


def reference_kinds(variant: str, num_beams: int) -> dict[str, dict]:
    """The reference's generate settings that apply (see the module docstring): name -> extra kwargs."""
    compiled = transformers.CompileConfig()
    compiled._compile_all_devices = True  # generate compiles its forward pass on CPU too
    kinds = {"dynamic cache": {}}
    if variant == "sequence" or num_beams == 1:
        kinds["static cache"] = {"cache_implementation": "static"}
        kinds["static cache + torch.compile"] = {"cache_implementation": "static", "compile_config": compiled}
    return kinds


@dataclasses.dataclass
class Row:
    size: str
    variant: str
    decoding: str  # "-" (RAG-Token), "thorough" or "fast"
    num_beams: int
    reference: str  # a key of reference_kinds
    reference_first_call_s: float
    tokens: dict  # side -> generated tokens per call
    seconds: dict  # side -> timed seconds per call
    first_call_s: float
    compile_s: dict  # "trace" / "lower" / "compile" -> seconds during the first call
    second_batch: str  # traces / compilations of a same-shape second batch, and its wall time
    same: str
    load: tuple[float, float]


def bench(size_name: str, variant: str, num_beams: int, model, rag, events: CompileEvents, args) -> list[Row]:
    """One (size, variant, beams) setting: a row per rag_jax mode (RAG-Sequence: thorough, fast) and
    reference kind."""
    size = SIZES[size_name]
    kw = dict(n_docs=size.n_docs, num_beams=num_beams, max_length=size.max_length, min_length=size.max_length)
    modes = {"-": dict(kw)} if variant == "token" else {
        "thorough": dict(kw, decoding="thorough", mask_candidate_search=False),
        "fast": dict(kw, decoding="fast"),
    }  # fmt: skip
    batches = [contexts(size, seed) for seed in (0, 1)]

    def reference(kind):
        def generate():
            ids, mask, scores = (torch.tensor(x) for x in batches[0])
            with torch.no_grad():
                return model.generate(
                    context_input_ids=ids, context_attention_mask=mask, doc_scores=scores, **kw, **kinds[kind]
                ).numpy()

        return generate

    def ours(mode, batch=0):
        return lambda: rag.generate(*batches[batch], variant=variant, **modes[mode])

    label = f"[{size_name} RAG-{variant} beams={num_beams}]"
    kinds = reference_kinds(variant, num_beams)
    refs = {kind: timed(reference(kind)) for kind in kinds}  # (ids, seconds of the first call)
    for kind, (out, seconds) in refs.items():
        print(f"{label} reference, {kind}: first call {seconds:.1f} s, {compare(out, refs['dynamic cache'][0])}")
    first, checks = {}, {}
    for mode in modes:
        jax.clear_caches()
        out, seconds, _, compile_s = events.during(ours(mode))
        _, second_s, count, _ = events.during(ours(mode, batch=1))
        traced, compiled = count.get("trace", 0), count.get("compile", 0)
        first[mode] = out, seconds, compile_s
        checks[mode] = f"{traced} traces, {compiled} compilations ({second_s:.3f} s)"
        print(f"{label} {mode}: first call {seconds:.1f} s {compile_s}; 2nd batch: {checks[mode]}", flush=True)

    load_before = wait_for_quiet_cpu(args.load_limit, args.max_wait)
    fns = {
        **{f"reference {kind}": reference(kind) for kind in kinds},
        **{f"rag_jax {mode}": ours(mode) for mode in modes},
    }
    timing = alternate(fns, args.rounds * args.calls, size.warmup, args.rounds, pause=0.05, verbose=True)
    load = (load_before, os.getloadavg()[0])
    rows = []
    for (mode, (out, first_call_s, compile_s)), (kind, (out_ref, ref_first_s)) in itertools.product(
        first.items(), refs.items()
    ):
        same = compare(out, out_ref)
        if mode == "fast":
            same = f"vs reference thorough: {same}"
        rows.append(Row(
            size_name, variant, mode, num_beams, kind, ref_first_s,
            tokens={"reference": generated_tokens(out_ref), "rag_jax": generated_tokens(out)},
            seconds={"reference": timing[f"reference {kind}"].seconds, "rag_jax": timing[f"rag_jax {mode}"].seconds},
            first_call_s=first_call_s, compile_s=compile_s, second_batch=checks[mode], same=same, load=load,
        ))  # fmt: skip
    return rows


def pinning() -> str:
    """``taskset -c CPUS `` when the process may run on fewer than all the machine's cores, else ""."""
    cpus = sorted(os.sched_getaffinity(0))
    return "" if len(cpus) == os.cpu_count() else f"taskset -c {','.join(map(str, cpus))} "


def report(rows: list[Row], peaks: tuple[float, float], args, total_s: float) -> str:
    lines = [
        "# RAG generation: rag_jax vs transformers (PyTorch) generate, CPU",
        "",
        (
            "| size | variant | decoding | beams | reference | reference tok/s | rag_jax tok/s "
            "| **rag_jax / reference** | reference s/call (median; min-max) | rag_jax s/call (median; min-max) "
            "| tokens/call ref / rag_jax | reference first call (s) | rag_jax first call (s) "
            "| trace + lower + XLA compile (s) | same-shape 2nd batch | outputs | load before/after |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def spread(seconds):
        return f"{statistics.median(seconds):.3f}; {min(seconds):.3f}-{max(seconds):.3f}"

    for r in rows:
        ref_tps = r.tokens["reference"] / statistics.median(r.seconds["reference"])
        ours_tps = r.tokens["rag_jax"] / statistics.median(r.seconds["rag_jax"])
        decoding = {"-": "-", "thorough": "thorough", "fast": "fast (reference: thorough)"}[r.decoding]
        c = r.compile_s
        compile_s = f"{c.get('trace', 0):.1f} + {c.get('lower', 0):.1f} + {c.get('compile', 0):.1f}"
        lines.append(
            f"| {r.size} | RAG-{r.variant.capitalize()} | {decoding} | {r.num_beams} | {r.reference} | {ref_tps:.1f} "
            f"| {ours_tps:.1f} | **{ours_tps / ref_tps:.2f}x** | {spread(r.seconds['reference'])} "
            f"| {spread(r.seconds['rag_jax'])} | {r.tokens['reference']} / {r.tokens['rag_jax']} "
            f"| {r.reference_first_call_s:.1f} | {r.first_call_s:.1f} | {compile_s} "
            f"| {r.second_batch} | {r.same} | {r.load[0]:.2f}/{r.load[1]:.2f} |"
        )
    lines += ["", "Settings:", ""]
    for name in dict.fromkeys(r.size for r in rows):
        s = SIZES[name]
        g = s.generator
        lines.append(
            f"- {name}: BART d_model {g['d_model']}, {g['encoder_layers']}+{g['decoder_layers']} layers, "
            f"{g['encoder_attention_heads']} heads, FFN {g['encoder_ffn_dim']}, vocab {g['vocab_size']}; "
            f"B={s.batch} questions, K={s.n_docs} documents, context length S={s.context_len} (right-padded, "
            f"lengths S/2..S), max_length=min_length={s.max_length} ({s.max_length - 1} generated tokens per "
            "returned sequence)."
        )
    warmups = ", ".join(
        f"{name}: {SIZES[name].warmup} untimed warmup call(s)" for name in dict.fromkeys(r.size for r in rows)
    )
    lines += [
        "",
        (
            "float32 (jax_default_matmul_precision=highest), transformers' default random initialisation. "
            "tok/s = generated tokens of the returned sequences (after the decoder start, EOS included, no padding) "
            "/ median seconds per call; the ratio is the throughput ratio (> 1: rag_jax faster). RAG-Sequence "
            "thorough: rag_jax with mask_candidate_search=False (the reference's algorithm); fast: rag_jax's Fast "
            "Decoding (default mask_candidate_search=True), which transformers does not implement, against the "
            "reference's thorough decoding. Reference: dynamic KV cache (generate's default), static cache "
            "(cache_implementation='static'), static cache + torch.compile (generate's auto-compilation of the "
            "forward pass, forced on CPU by CompileConfig._compile_all_devices), where RAG's generate supports them "
            "(no static cache for RAG-Token beam search: see the script's docstring); reference first call = the "
            f"untimed call that checks its outputs (it compiles, for torch.compile). Timing: {args.rounds} rounds of "
            f"blocks (each reference kind, then each rag_jax mode), each block {warmups} and {args.calls} timed "
            "call(s), 50 ms pause before every call; "
            "medians over the timed calls. First call = trace + compile + one generation of a fresh program "
            "(jax caches cleared); its trace / lower / compile seconds are jax's monitoring events. Same-shape 2nd "
            "batch = traces and XLA compilations triggered by generating a batch with other ids, padding and doc "
            "scores of the same padded shape (0 / 0: one compiled program serves the shape bucket), and that "
            f"call's wall time. Threads: torch.set_num_threads({args.threads}); XLA:CPU uses the "
            f"{len(os.sched_getaffinity(0))} core(s) the process may run on (CPU affinity {sorted(os.sched_getaffinity(0))}). "
            "Load = 1-minute load average before/after timing (this benchmark's own work counts in it); absolute "
            "figures drift with the host, the ratios are measured within one run with alternating blocks. "
            f"Total run time {total_s:.0f} s."
        ),
        "",
        (
            f"Measured float32 matmul peak (2048x2048, best of 10): jitted jnp.dot {peaks[0] / 1e9:.1f} GFLOP/s, "
            f"torch.mm {peaks[1] / 1e9:.1f} GFLOP/s."
        ),
        "",
        f"Command: `{pinning()}python {' '.join(sys.argv)}`",
        "",
        f"Machine: {machine()}",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    if argv is None:  # both sides run with huge pages for malloc, as the rag-jax command does
        host_memory.reexec_with_huge_pages()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["small", "base", "both"], default="both")
    parser.add_argument("--variant", choices=["token", "sequence", "both"], default="both")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=5, help="blocks per side")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per block (after the warmup calls)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--load-limit", type=float, default=1.5, help="wait until the load average is below this")
    parser.add_argument("--max-wait", type=float, default=0.0, help="longest wait for a quiet CPU (s)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    events = CompileEvents()
    peaks = matmul_peak()
    sizes = ["small", "base"] if args.size == "both" else [args.size]
    variants = ["token", "sequence"] if args.variant == "both" else [args.variant]
    rows = []
    for size_name in sizes:
        for variant in variants:
            print(f"[{size_name} RAG-{variant}] building models", flush=True)
            model = torch_rag(SIZES[size_name], variant)
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                rag = load_rag(folder)
            for n in args.beams:
                rows += bench(size_name, variant, n, model, rag, events, args)
    text = report(rows, peaks, args, time.perf_counter() - start)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
