"""Training-step benchmark: rag_jax's jitted RAG step against the transformers PyTorch RAG step.

Both sides train the same randomly initialised model (built with transformers, saved, loaded into
rag_jax with ``load_rag``) on the same synthetic batch, float32, dropout on, with the transformers RAG
fine-tuning recipe: label smoothing 0.1, batch-summed loss, grad-norm clip 0.1, AdamW (lr 3e-5,
weight decay 0.001 on matrices only), warmup 500 then linear decay.

* reference: ``Rag{Token,Sequence}ForGeneration`` forward with ``context_input_ids`` /
  ``context_attention_mask`` ``[B*K, S]`` (document fastest), ``doc_scores`` from the question
  encoder's CLS vector and the retrieved documents' embeddings by ``torch.bmm`` (so the question
  encoder is trained, as in transformers' RAG fine-tuning), ``labels``, ``reduce_loss=True``; then
  ``backward``, ``clip_grad_norm_``, ``AdamW(..., fused=True).step`` (torch's fastest AdamW, one
  kernel per parameter), scheduler step, ``zero_grad``;
* reference, ``torch.compile``: the same step with the loss function ``torch.compile``d (forward
  and, through AOTAutograd, backward); where it does not compile, the report says so with the
  error's first line (``--no-torch-compile``: not run);
* rag_jax: ``Trainer(model, resolve(reference_recipe() with train.form="hf").train).train_step`` (jitted, donated).

Both sides run in one process, in rounds of blocks (a reference block, then a rag_jax block), each
block starting with ``--warmup`` untimed steps; the table gives median step times, steps/s and
examples/s, the throughput ratio rag_jax / reference, the compile time of the jitted step, the
step's FLOPs from XLA's cost analysis and the fraction of the machine's measured float32 matmul peak
(a jitted 2048x2048 ``jnp.dot``) that they represent, and the minor page faults per step.
``--breakdown`` also times the forward pass alone and forward + backward (no optimizer) on both
sides, and the update phase alone: rag_jax's jitted, donated ``Trainer.update`` (clip + fused AdamW)
against ``clip_grad_norm_`` + ``AdamW(fused=True).step()`` on the same parameters with random
gradients, set against the memory-traffic bound (28 bytes per parameter: read parameter, gradient
and both moments, write parameter and moments, at the bandwidth of a jitted ``y += x / 2``). The
peak RSS of each side's training step is measured in a fresh process per side (``--no-memory``:
skipped), next to XLA's temporary buffer of the step. Before timing, both sides' dropout-free losses on the batch are compared (same weights, same
objective). Run as a script, the benchmark first re-executes itself with glibc's malloc using
transparent huge pages, as the ``rag-jax`` command runs (``rag_jax.commands.host_memory``); the reference shares
the process and so the setting (``RAG_JAX_HUGE_PAGES=0`` runs both without).

    python experiments/bench/train_step.py --size both --out experiments/bench/results/train_step.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: no accelerator probes (libtpu in the dev set-up)

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from rag_jax.commands import host_memory
from rag_jax.config import reference_recipe, resolve, with_changes
from rag_jax.hf.rag import load_rag
from rag_jax.rag.batches import DenseRagBatch
from rag_jax.training.optim import global_norm
from rag_jax.training.step import Trainer

# Both sides get the same threads: torch.set_num_threads(--threads); XLA:CPU uses every core (its
# intra-op pool has no finer knob than on/off), so --threads defaults to nproc.

jax.config.update("jax_default_matmul_precision", "highest")  # float32 matmuls, as torch's

PAD, BOS, EOS = 1, 0, 2
LABEL_SMOOTHING = 0.1
RECIPE = resolve(reference_recipe()).train.optimizer  # lr 3e-5, weight decay 0.001, clip 0.1, warmup 500, linear decay


@dataclasses.dataclass(frozen=True)
class Size:
    """Model and batch shape of one benchmark size."""

    question_encoder: dict  # transformers DPRConfig kwargs
    generator: dict  # transformers BartConfig kwargs
    batch: int
    n_docs: int
    question_len: int
    context_len: int
    target_len: int


SIZES = {
    "tiny": Size(
        question_encoder=dict(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            max_position_embeddings=128,
        ),
        generator=dict(
            vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=128,
        ),
        batch=8, n_docs=5, question_len=16, context_len=64, target_len=16,
    ),
    # BERT-base question encoder (DPR's), BART-base generator; the recipe's target length 25.
    "mid": Size(
        question_encoder=dict(
            vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=512,
        ),
        generator=dict(
            vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
            decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
        ),
        batch=2, n_docs=5, question_len=32, context_len=128, target_len=25,
    ),
}  # fmt: skip
DEFAULT_STEPS = {"tiny": 30, "mid": 4}
DROPOUT = {  # the recipe's --dropout 0.1 --attention_dropout 0.1; DPR's defaults
    "question_encoder": {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
    "generator": {"dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0},
}


# ------------------------------------------------------------------------------------------------
# Models and data


def torch_rag(size: Size, variant: str, seed: int = 0):
    """A random transformers RAG model (DPR question encoder + BART generator), train mode."""
    torch.manual_seed(seed)
    qe = transformers.DPRQuestionEncoder(
        transformers.DPRConfig(**size.question_encoder, **DROPOUT["question_encoder"])
    )
    gen = transformers.BartForConditionalGeneration(transformers.BartConfig(**size.generator, **DROPOUT["generator"]))
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        qe.config, gen.config, n_docs=size.n_docs, label_smoothing=LABEL_SMOOTHING, reduce_loss=True
    )
    cls = transformers.RagTokenForGeneration if variant == "token" else transformers.RagSequenceForGeneration
    return cls(config, question_encoder=qe, generator=gen).train()


def make_batch(size: Size, seed: int = 0) -> DenseRagBatch:
    """A synthetic rag_jax batch: random tokens, some padded contexts and targets."""
    rng = np.random.default_rng(seed)
    b, k, s, t, sq = size.batch, size.n_docs, size.context_len, size.target_len, size.question_len
    q_vocab, g_vocab = size.question_encoder["vocab_size"], size.generator["vocab_size"]
    question = rng.integers(1000 if q_vocab > 2000 else 3, q_vocab, size=(b, sq))
    question_mask = np.ones_like(question)
    question_mask[0, sq // 2 :] = 0
    context = rng.integers(3, g_vocab, size=(b, k, s))
    context_mask = np.ones_like(context)
    context_mask[:, -1, -s // 4 :] = 0
    context[context_mask == 0] = PAD
    labels = rng.integers(3, g_vocab, size=(b, t))
    labels[:, 0] = BOS
    labels[0, t - t // 3 :] = PAD
    labels[np.arange(b), np.where(labels[:, -1] == PAD, t - t // 3 - 1, t - 1)] = EOS
    d = size.question_encoder["hidden_size"]
    return DenseRagBatch(
        question_input_ids_BxQ=question.astype(np.int32),
        question_attention_mask_BxQ=question_mask.astype(np.int32),
        doc_embeddings_BxKxD=(rng.normal(size=(b, k, d)) / np.sqrt(d)).astype(np.float32),
        context_input_ids_BxKxS=context.astype(np.int32),
        context_attention_mask_BxKxS=context_mask.astype(np.int32),
        labels_BxT=labels.astype(np.int32),
    )


def torch_batch(batch: DenseRagBatch) -> dict[str, torch.Tensor]:
    """The same batch as the reference reads it: contexts flattened to ``[B*K, S]``, document fastest."""
    b, k, s = batch.context_input_ids_BxKxS.shape
    return {
        "question_input_ids": torch.tensor(batch.question_input_ids_BxQ, dtype=torch.long),
        "question_attention_mask": torch.tensor(batch.question_attention_mask_BxQ, dtype=torch.long),
        "doc_embeddings": torch.tensor(batch.doc_embeddings_BxKxD),
        "context_input_ids": torch.tensor(batch.context_input_ids_BxKxS.reshape(b * k, s), dtype=torch.long),
        "context_attention_mask": torch.tensor(batch.context_attention_mask_BxKxS.reshape(b * k, s), dtype=torch.long),
        "labels": torch.tensor(batch.labels_BxT, dtype=torch.long),
    }


# ------------------------------------------------------------------------------------------------
# The reference step


def torch_loss(model, tb: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch-summed RAG loss, doc_scores from the question encoder (gradients reach it)."""
    q_BxD = model.question_encoder(tb["question_input_ids"], attention_mask=tb["question_attention_mask"])[0]
    doc_scores_BxK = torch.bmm(q_BxD.unsqueeze(1), tb["doc_embeddings"].transpose(1, 2)).squeeze(1)
    out = model(
        context_input_ids=tb["context_input_ids"],
        context_attention_mask=tb["context_attention_mask"],
        doc_scores=doc_scores_BxK,
        labels=tb["labels"],
        n_docs=tb["doc_embeddings"].shape[1],
        reduce_loss=True,
    )
    return out.loss


class TorchStep:
    """transformers' RAG fine-tuning step: loss, backward, clip, AdamW, schedule, zero_grad."""

    def __init__(self, model):
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [  # no weight decay on biases and LayerNorm weights (1-D), as the fine-tuning scripts
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": RECIPE.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            groups, lr=RECIPE.learning_rate, betas=(RECIPE.b1, RECIPE.b2), eps=RECIPE.eps, fused=True
        )
        self.scheduler = transformers.get_linear_schedule_with_warmup(
            self.optimizer, RECIPE.warmup_steps, RECIPE.total_steps
        )

    def __call__(self, tb, loss_fn=torch_loss) -> float:
        loss = loss_fn(self.model, tb)
        loss.backward()
        self.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    def update(self) -> None:
        """The update phase: clip the gradients by their global norm, AdamW step."""
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), RECIPE.clip_norm)
        self.optimizer.step()


def compiled_loss(model, tb) -> tuple[object | None, float, str | None]:
    """``torch.compile(torch_loss)``, the seconds of its first forward + backward (the compilation),
    and None; or None, 0 and why not (the first line of the error) where it does not compile."""
    loss_fn = torch.compile(torch_loss)
    try:
        (_, seconds) = timed(lambda: loss_fn(model, tb).backward())
    except Exception as e:  # noqa: BLE001 -- any compiler failure is reported, not raised
        return None, 0.0, f"did not compile: `{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}`"
    finally:
        model.zero_grad(set_to_none=True)
    return loss_fn, seconds, None


# ------------------------------------------------------------------------------------------------
# Timing


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclasses.dataclass
class Timing:
    """Timed calls of one side: seconds and minor page faults per call."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    faults: list[int] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def alternate(fns: dict, steps: int, warmup: int, rounds: int, pause: float, verbose: bool = False) -> dict:
    """Time ``fns`` (name -> no-argument callable) in ``rounds`` rounds; in each round every function
    runs a block of ``warmup`` untimed then ``ceil(steps / rounds)`` timed calls.

    Blocks, not single calls, because the first call after switching frameworks pays for the other
    one's leftovers (its freed memory, its spinning threads): measured 10-20% on either side. A short
    ``pause`` before every call lets the other side's threads go idle.
    """
    per_round = -(-steps // rounds)
    out = {name: Timing() for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            for i in range(warmup + per_round):
                time.sleep(pause)
                faults = minor_faults()
                _, seconds = timed(fn)
                if i >= warmup:
                    out[name].seconds.append(seconds)
                    out[name].faults.append(minor_faults() - faults)
                if verbose:
                    print(f"  round {r} {name} call {i}: {seconds:.4f} s", flush=True)
    return out


def matmul_peak(n: int = 2048, reps: int = 10) -> tuple[float, float]:
    """Measured float32 matmul FLOP/s of a jitted ``jnp.dot`` and of ``torch.mm`` (n x n), best of reps."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    jax_s = min(timed(lambda: dot(a, a).block_until_ready())[1] for _ in range(reps))
    ta = torch.randn(n, n)
    torch.mm(ta, ta)
    torch_s = min(timed(torch.mm, ta, ta)[1] for _ in range(reps))
    return 2 * n**3 / jax_s, 2 * n**3 / torch_s


def memory_bandwidth(n: int = 1 << 26, reps: int = 10) -> float:
    """Measured bytes/s of a jitted, donated ``y += x / 2`` over float32 arrays of ``n`` elements
    (read x and y, write y), best of reps."""
    x, y = jnp.ones(n, jnp.float32), jnp.zeros(n, jnp.float32)
    axpy = jax.jit(lambda y, x: y + x / 2, donate_argnums=0)
    y = axpy(y, x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        y = axpy(y, x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 3 * 4 * n / best


def wait_for_quiet_cpu(limit: float, max_wait_s: float) -> float:
    """Poll the 1-minute load average every 30 s until it is below ``limit`` (or time runs out)."""
    deadline = time.time() + max_wait_s
    while os.getloadavg()[0] >= limit and time.time() < deadline:
        print(f"  load {os.getloadavg()[0]:.2f} >= {limit}: waiting", flush=True)
        time.sleep(30)
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------------
# Memory


def _status_kib(field: str) -> int:
    return int(_proc_field("/proc/self/status", field).split()[0])


def reference_recipe_trainer(rag, variant: str) -> Trainer:
    """rag_jax's trainer with the reference's recipe and exact loss (``form="hf"``)."""
    config = with_changes(reference_recipe(), rag={"variant": variant}, train={"form": "hf"})
    return Trainer(rag, resolve(config).train)


def step_memory(side: str, folder: str, size_name: str, variant: str, threads: int, steps: int = 2) -> tuple[int, int]:
    """Run in a fresh process: one side's training step on the model saved in ``folder``. After a
    first step (compilation, optimizer state), the RSS and the peak RSS over ``steps`` more steps
    (bytes; the peak counter is reset through /proc/self/clear_refs)."""
    torch.set_num_threads(threads)
    batch = make_batch(SIZES[size_name])
    if side == "reference":
        cls = transformers.RagTokenForGeneration if variant == "token" else transformers.RagSequenceForGeneration
        torch_step, tb = TorchStep(cls.from_pretrained(folder).train()), torch_batch(batch)

        def step():
            torch_step(tb)

    else:
        trainer = reference_recipe_trainer(load_rag(folder), variant)
        state = [trainer.init_state()]

        def step():
            state[0], _ = jax.block_until_ready(trainer.train_step(state[0], batch))

    step()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")
    for _ in range(steps):
        step()
    return 1024 * before, 1024 * _status_kib("VmHWM")


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new Python process (spawned: nothing inherited but the environment)."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


@dataclasses.dataclass
class Result:
    size: str
    settings: str
    params_m: float
    step: dict  # "reference" / "reference (torch.compile)" / "rag_jax" -> Timing
    first_call_s: float
    compile_s: float
    torch_compile: tuple[float, str | None]  # first compiled step's seconds, or why there is none
    flops: float
    temp_bytes: int
    loss_check: str
    load: tuple[float, float]
    memory: dict | None  # side -> (RSS after a first step, peak RSS over the next steps), bytes
    breakdown: dict | None = None  # part -> {"reference": Timing, "rag_jax": Timing}
    update: dict | None = None  # the update phase alone: see time_update


def bench_size(name: str, variant: str, args) -> Result:
    size = SIZES[name]
    steps = args.steps if args.steps is not None else DEFAULT_STEPS[name]
    print(f"[{name}] building models", flush=True)
    model = torch_rag(size, variant)
    memory = None
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        rag = load_rag(folder)
        if args.memory:
            print(f"[{name}] peak RSS of each side's step, each in a fresh process", flush=True)
            memory = {side: in_fresh_process(step_memory, side, folder, name, variant, args.threads)
                      for side in ("reference", "rag_jax")}  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    batch = make_batch(size)
    tb = torch_batch(batch)
    trainer = reference_recipe_trainer(rag, variant)
    state = trainer.init_state()

    # Same weights, same objective: the dropout-free losses agree.
    model.eval()
    with torch.no_grad():
        ref = float(torch_loss(model, tb))
    model.train()
    ours = float(jax.jit(lambda p, b: trainer.eval_loss(p, b).sum())(state.params, batch))
    loss_check = f"{ours:.4f} vs {ref:.4f} (rel. diff {abs(ours - ref) / abs(ref):.1e})"
    print(f"[{name}] dropout-free loss, rag_jax vs reference: {loss_check}", flush=True)

    wait_for_quiet_cpu(args.load_limit, 600)
    print(f"[{name}] first rag_jax step (traces and compiles)", flush=True)
    (state, _), first_call_s = timed(lambda: jax.block_until_ready(trainer.train_step(state, batch)))
    with warnings.catch_warnings():  # the batch's int buffers cannot be reused for the outputs: expected
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        # the Trainer's own jitted step, compiled again ahead of time: its compile time, FLOPs, temp memory
        compiled, compile_s = timed(lambda: trainer._steps[type(batch)].lower(state, batch).compile())
    flops = compiled.cost_analysis()["flops"]
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes

    torch_step = TorchStep(model)
    jax_state = [state]

    def jax_step():
        jax_state[0], metrics = jax.block_until_ready(trainer.train_step(jax_state[0], batch))
        return metrics

    print(f"[{name}] torch.compile of the reference loss", flush=True)
    loss_fn, torch_compile_s, compile_error = (
        compiled_loss(model, tb) if args.torch_compile else (None, 0.0, "not run (--no-torch-compile)")
    )
    print(f"[{name}] torch.compile: {compile_error or f'first forward + backward {torch_compile_s:.1f} s'}", flush=True)
    fns = {"reference": lambda: torch_step(tb)}
    if loss_fn is not None:
        fns["reference (torch.compile)"] = lambda: torch_step(tb, loss_fn)
    load_before = wait_for_quiet_cpu(args.load_limit, 600)
    step = alternate({**fns, "rag_jax": jax_step}, steps, args.warmup, args.rounds, args.pause, verbose=True)
    load_after = os.getloadavg()[0]

    parts = update = None
    if args.breakdown:
        parts = time_parts(model, tb, trainer, jax_state[0], batch, steps, args)
        update = time_update(torch_step, trainer, jax_state.pop(), steps, args)
    settings = (
        f"B={size.batch}, K={size.n_docs}, question len {size.question_len}, context len S={size.context_len}, "
        f"target len T={size.target_len}"
    )
    return Result(name, settings, n_params / 1e6, step, first_call_s, compile_s, (torch_compile_s, compile_error),
                  flops, temp_bytes, loss_check, (load_before, load_after), memory, parts, update)  # fmt: skip


def time_parts(model, tb, trainer: Trainer, state, batch, steps: int, args) -> dict:
    """The forward pass alone (torch: with the autograd graph, as in training) and forward + backward
    (rag_jax: returning the loss and the gradients' global norm, so the gradients are computed but
    not copied out)."""
    key = jax.random.key(1)

    def loss(params, batch):
        return jnp.sum(trainer.per_example_loss(params, batch, key))

    def loss_and_grad_norm(params, batch):  # every gradient computed, none materialised as an output
        value, grads = jax.value_and_grad(loss)(params, batch)
        return value, optax.global_norm(grads)

    forward, grads = jax.jit(loss), jax.jit(loss_and_grad_norm)
    device_batch = jax.device_put(batch)

    def torch_grads():
        torch_loss(model, tb).backward()
        model.zero_grad(set_to_none=True)

    parts = {
        "forward": {
            "reference": lambda: torch_loss(model, tb).item(),
            "rag_jax": lambda: jax.block_until_ready(forward(state.params, device_batch)),
        },
        "forward + backward": {
            "reference": torch_grads,
            "rag_jax": lambda: jax.block_until_ready(grads(state.params, device_batch)),
        },
    }
    out = {}
    for label, fns in parts.items():
        print(f"  breakdown: {label}", flush=True)
        fns["rag_jax"]()  # compile
        out[label] = alternate(fns, steps, args.warmup, args.rounds, args.pause)
    return out


def time_update(torch_step: TorchStep, trainer: Trainer, state, steps: int, args) -> dict:
    """The update phase alone on random gradients: rag_jax's jitted update as the step runs it (global
    norm, non-finite guard, clip factor + fused AdamW: ``trainer.tx.step``) with parameters and optimizer state donated (``state`` is consumed), against
    the reference's ``clip_grad_norm_`` + ``AdamW(fused=True).step()`` and its AdamW step alone; with
    the number of parameters (for the memory-traffic bound) and the update's XLA temp buffer."""
    for p in torch_step.model.parameters():
        p.grad = 1e-3 * torch.randn_like(p)
    key = jax.random.key(2)
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(key, p.shape, p.dtype), state.params)
    def update(params, opt_state, grads):  # the step's update: global norm, non-finite guard, fused AdamW
        return trainer.tx.step(params, opt_state, grads, ~jnp.isfinite(global_norm(grads)))

    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(state.params, state.opt_state, grads).compile()
    jax_state = [state.params, state.opt_state]

    def jax_update():
        jax_state[:] = jax.block_until_ready(compiled(*jax_state, grads))

    fns = {"reference": torch_step.update, "reference AdamW step": torch_step.optimizer.step, "rag_jax": jax_update}
    print("  update phase alone", flush=True)
    timing = alternate(fns, steps, args.warmup, args.rounds, args.pause)
    torch_step.optimizer.zero_grad(set_to_none=True)
    n_params = sum(x.size for x in jax.tree.leaves(jax_state[0]))
    return {"timing": timing, "params": n_params, "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}


# ------------------------------------------------------------------------------------------------
# Report


def _proc_field(path: str, name: str) -> str:
    """The value of the first ``name: value`` line of a /proc file ("?" if absent)."""
    with open(path, encoding="utf-8") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith(name)), "?")


def machine() -> str:
    cpu, mem = _proc_field("/proc/cpuinfo", "model name"), _proc_field("/proc/meminfo", "MemTotal")
    flags = _proc_field("/proc/cpuinfo", "flags").split()
    simd = "/".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags)
    nproc = len(os.sched_getaffinity(0))
    return (
        f"nproc {nproc}, {cpu} ({simd}), {mem} RAM, Python {platform.python_version()}, jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
    )


REFERENCES = {"reference": "eager", "reference (torch.compile)": "torch.compile'd loss"}


def torch_compile_outcome(r: Result) -> str:
    seconds, error = r.torch_compile
    return error or f"first compiled forward + backward {seconds:.1f} s"


def update_line(r: Result, bandwidth: float) -> str:
    """The update phase alone against torch's fused AdamW and the memory-traffic bound."""
    u = r.update
    t, a, j = (u["timing"][side].median for side in ("reference", "reference AdamW step", "rag_jax"))
    bound = 28 * u["params"] / bandwidth
    return (
        f"- {r.size}, update phase alone: rag_jax `Trainer.update` (jitted, donated; clip + fused AdamW) {j:.4f} s; "
        f"reference `clip_grad_norm_` + `AdamW(fused=True).step()` {t:.4f} s (**{t / j:.2f}x**), the AdamW step "
        f"alone {a:.4f} s ({a / j:.2f}x); memory-traffic bound 28 B x {u['params'] / 1e6:.1f}M parameters / "
        f"{bandwidth / 1e9:.1f} GB/s = {bound:.4f} s: rag_jax **{j / bound:.2f}x** the bound, torch's AdamW step "
        f"{a / bound:.2f}x; XLA temp buffer of the jitted update {u['temp_bytes'] / 2**20:.1f} MiB."
    )


def memory_line(r: Result) -> str:
    gib = [(side, (before / 2**30, peak / 2**30)) for side, (before, peak) in r.memory.items()]
    return (
        f"- {r.size}, peak RSS over two training steps, each side alone in a fresh process after a first step: "
        + "; ".join(f"{side} **{peak:.2f} GiB** (RSS before them {before:.2f} GiB)" for side, (before, peak) in gib)
        + f"; XLA temp buffer of the rag_jax step {r.temp_bytes / 2**20:.0f} MiB."
    )


def report(results: list[Result], peaks: tuple[float, float], bandwidth: float, args, total_s: float) -> str:
    jax_peak, torch_peak = peaks
    lines = [
        "# RAG training step: rag_jax vs transformers (PyTorch), CPU",
        "",
        (
            "| size | reference | params (M) | reference step (s) | rag_jax step (s) | reference steps/s | rag_jax steps/s "
            "| reference ex/s | rag_jax ex/s | **rag_jax / reference** | rag_jax compile (s) | step GFLOP (XLA) "
            "| reference % of peak | rag_jax % of peak | page faults/step ref / rag_jax |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for side, kind in REFERENCES.items():
            if side not in r.step:
                lines.append(f"| {r.size} | {kind} | {r.torch_compile[1]} |")
                continue
            t, j = r.step[side].median, r.step["rag_jax"].median
            b = SIZES[r.size].batch
            faults = " / ".join(f"{statistics.median(r.step[s].faults) / 1e3:.0f}k" for s in (side, "rag_jax"))
            lines.append(
                f"| {r.size} | {kind} | {r.params_m:.1f} | {t:.4f} | {j:.4f} | {1 / t:.2f} | {1 / j:.2f} "
                f"| {b / t:.2f} | {b / j:.2f} "
                f"| **{t / j:.2f}x** | {r.compile_s:.1f} | {r.flops / 1e9:.1f} | {100 * r.flops / t / jax_peak:.0f}% "
                f"| {100 * r.flops / j / jax_peak:.0f}% | {faults} |"
            )
    if any(r.breakdown for r in results):
        lines += [
            "", ("Breakdown (median s; optimizer = full step - (forward + backward), eager reference; update phase "
                 "alone: see below):"), "",
            "| size | part | reference (s) | rag_jax (s) | rag_jax / reference |", "|---|---|---|---|---|",
        ]  # fmt: skip
        for r in results:
            if not r.breakdown:
                continue
            rows = {label: (p["reference"].median, p["rag_jax"].median) for label, p in r.breakdown.items()}
            fb = rows["forward + backward"]
            rows["optimizer (step - fwd/bwd)"] = (r.step["reference"].median - fb[0], r.step["rag_jax"].median - fb[1])
            update = r.update["timing"]
            rows["update phase alone (clip + AdamW)"] = (update["reference"].median, update["rag_jax"].median)
            for label, (t, j) in rows.items():
                lines.append(f"| {r.size} | {label} | {t:.4f} | {j:.4f} | {t / j:.2f}x |")
        lines += [""] + [update_line(r, bandwidth) for r in results if r.update]
    lines += ["", "Settings:", ""]
    for r in results:
        ref, ours = r.step["reference"], r.step["rag_jax"]
        lines.append(
            f"- {r.size}: {r.settings}; {len(ours.seconds)} timed steps per side; min/max step (s): reference "
            f"{min(ref.seconds):.4f}/{max(ref.seconds):.4f}, rag_jax {min(ours.seconds):.4f}/{max(ours.seconds):.4f}; "
            f"first rag_jax call (trace + compile + 1 step) {r.first_call_s:.1f} s; XLA temp buffer "
            f"{r.temp_bytes / 2**20:.0f} MiB per step; 1-min load average before/after timing "
            f"{r.load[0]:.2f}/{r.load[1]:.2f}; dropout-free loss rag_jax vs reference {r.loss_check}; "
            f"torch.compile: {torch_compile_outcome(r)}."
        )
    lines += [memory_line(r) for r in results if r.memory]
    lines += [
        "",
        (
            f"RAG-{args.variant.capitalize()}, float32 everywhere (jax_default_matmul_precision=highest), "
            "dropout 0.1 (attention dropout 0.1), label smoothing 0.1, batch-summed loss, clip 0.1, AdamW lr 3e-5 "
            "wd 0.001, warmup 500 + linear decay; reference: torch.optim.AdamW(fused=True), eager or with the loss "
            "function torch.compile'd (default inductor backend); rag_jax: "
            "`Trainer(model, resolve(reference_recipe() with train.form=\"hf\").train).train_step`, one device. "
            f"Threads: torch.set_num_threads({args.threads}); XLA:CPU uses all {os.cpu_count()} cores. "
            f"Timing: {args.rounds} rounds of blocks (reference block, rag_jax block), each block {args.warmup} "
            f"untimed warmup step(s) then its timed steps, {args.pause * 1e3:.0f} ms pause before every call; medians. "
            "rag_jax / reference = throughput ratio (> 1: rag_jax faster). Compile = AOT lower + compile of the "
            "Trainer's jitted step. % of peak = the step's XLA FLOP count / step time / the jnp.dot peak below "
            "(the same FLOP count for both sides). Page faults: minor faults of the process during one step."
        ),
        "",
        (
            f"Measured float32 matmul peak (2048x2048, best of 10): jitted jnp.dot {jax_peak / 1e9:.1f} GFLOP/s, "
            f"torch.mm {torch_peak / 1e9:.1f} GFLOP/s. Measured memory bandwidth (jitted, donated y += x / 2 over "
            f"256 MiB float32 arrays, best of 10): {bandwidth / 1e9:.1f} GB/s. Total run time {total_s:.0f} s."
        ),
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Machine: {machine()}",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    if argv is None:  # both sides run with huge pages for malloc, as the rag-jax command does
        host_memory.reexec_with_huge_pages()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "mid", "both"], default="both")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps per side (default: {DEFAULT_STEPS})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every block")
    parser.add_argument("--rounds", type=int, default=2, help="blocks per side")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds of idle before every timed call")
    parser.add_argument("--variant", choices=["token", "sequence"], default="token")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--breakdown", action="store_true", help="also time forward, fwd + bwd and the update alone")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-side peak-RSS runs")
    parser.add_argument("--no-torch-compile", dest="torch_compile", action="store_false",
                        help="skip the torch.compile'd reference")  # fmt: skip
    parser.add_argument("--load-limit", type=float, default=1.5, help="wait until the load average is below this")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    sizes = ["tiny", "mid"] if args.size == "both" else [args.size]
    wait_for_quiet_cpu(args.load_limit, 600)
    peaks, bandwidth = matmul_peak(), memory_bandwidth()
    print(f"matmul peak: jax {peaks[0] / 1e9:.1f} GFLOP/s, torch {peaks[1] / 1e9:.1f} GFLOP/s; "
          f"memory bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)  # fmt: skip
    results = [bench_size(name, args.variant, args) for name in sizes]
    text = report(results, peaks, bandwidth, args, time.perf_counter() - start)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
