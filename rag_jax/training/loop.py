"""The training run a researcher launches: data -> retrieval -> jitted step -> evaluation ->
checkpoints and logs (``rag-jax train``).

Retrieval happens on the host inside the loop, with the question encoder being trained: the
encoder used to *retrieve* is refreshed every ``train.retrieval_refresh_every`` steps (1: the
current encoder, retrieval waits for the previous step; R > 1: retrieval for the next R steps runs in a
background thread ahead of the device, with an encoder up to R steps old; with the encoder frozen, or
closed-book, batches are always prepared ``LOOKAHEAD_STEPS`` ahead). The doc scores in the
loss are always recomputed from the *current* encoder inside the step, so the gradient is exact
for the retrieved set whatever R is.

Retrieval on the devices (``corpus.retriever=device``): the batches carry the questions alone and the
step retrieves from the corpus on the mesh with the current encoder (``rag_jax.retrieval.device``),
so batches are prepared ahead like a frozen encoder's; evaluation searches the same device arrays.

End-to-end retriever training (``train.doc_encoder=trained``): batches carry the retrieved passages'
tokens, which the step encodes with the trained document encoder; ``train.index_refresh`` keeps the
index stale (``none``), re-ranks ``train.rerank_candidates`` inside the step (``rerank``), or rebuilds
it in the background on a fixed schedule (``full``, ``rag_jax.training.reindex``): retrieval windows
end where the index generation changes.

Determinism: the batch order is a function of (seed, epoch), dropout keys live in the train state,
and the retrieval encoder snapshot (and, with a full refresh, the document-encoder snapshots of the
index generations in use and being built) is part of the checkpoint, so a run killed at any step and
restarted from its last checkpoint produces the same per-step losses as an uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from rag_jax.config import device_retrieval, resolve
from rag_jax.data import qa as data
from rag_jax.errors import ConfigError, UserError
from rag_jax.retrieval import ProcessShardedIndex
from rag_jax.training import checkpointing, components, reindex, sharding
from rag_jax.training.batches import closed_book_batch, questions_batch, rag_batch
from rag_jax.training.components import build_model, build_retriever, read_split, split_format, tokenizers
from rag_jax.training.evaluate import checkpoint_target, evaluate
from rag_jax.training.metric_writer import MetricWriter
from rag_jax.training.step import Trainer

log = logging.getLogger(__name__)

LOOKAHEAD_STEPS = 8  # batches prepared ahead of the device when retrieval cannot change


class NonFiniteLossError(UserError, RuntimeError):
    what = "training stopped"


# -- the loop ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Pending:
    """A batch being assembled (maybe in the background) for one step, with the data-iterator
    state right after it was drawn (what a checkpoint after that step records)."""

    future: concurrent.futures.Future
    examples: list
    data_state: dict


def _step_batches(iterator, examples, make_batch, window_end, retrieval_for, start_step: int,
                  background: bool = True) -> Iterator[_Pending]:  # fmt: skip
    """Batches for the steps after ``start_step``. The steps of each window ``(s, window_end(s)]`` are
    retrieved in one background thread, ahead of the device, with what ``retrieval_for(s + 1)`` returns
    when the window starts (the question encoder and the corpus; windows end at steps that depend on
    the step alone, so a resumed run retrieves with the same encoders and index as an uninterrupted one).
    ``background=False`` retrieves in the calling thread when the window starts (a search that is itself
    collective, ``ProcessShardedIndex``, must be issued in the same order as the steps' collectives)."""
    pool = _CallingThread() if not background else concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="retrieval")  # fmt: skip
    step = start_step
    try:
        while True:
            retrieval = retrieval_for(step + 1)
            window = []
            for _ in range(window_end(step) - step):  # all submitted now, run in order
                chosen = [examples[i] for i in next(iterator)]
                window.append(_Pending(pool.submit(make_batch, chosen, retrieval), chosen, iterator.state()))
                step += 1
            yield from window
    finally:  # the batch being retrieved is finished, so no thread outlives the loop
        pool.shutdown(wait=True, cancel_futures=True)


class _CallingThread:
    """The part of ``ThreadPoolExecutor`` ``_step_batches`` uses, running each call at once."""

    def submit(self, fn, *args) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _doc_snapshot(trainer: Trainer, state):
    """A copy of the document encoder's parameters in ``state`` (the step donates it), usable by this
    process (a generation's embedding runs on the host's devices)."""
    return sharding.process_local(jax.tree.map(jnp.copy, trainer.doc_params(state.params)))


def _restored_doc_snapshots(schedule: reindex.RefreshSchedule, completed: int, saved: dict) -> dict:
    """A checkpoint's ``doc_snapshots`` by the generation step each belongs to."""
    snapshots = {schedule.generation_for(completed + 1): saved["current"]}
    pending = schedule.pending_at(completed)
    if pending is not None:
        snapshots[pending] = saved["pending"]
    return snapshots


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def train(cfg: ml_collections.ConfigDict, *, progress: bool = True) -> dict:
    """Train (resuming from ``run_dir/checkpoints`` when a checkpoint is there), evaluate on the dev
    split every ``train.eval_every`` steps and at the end; returns the last dev metrics.

    The checkpoint holds ``{"train": TrainState, "retrieval_encoder": the question-encoder snapshot
    retrieval uses}`` and the data-iterator position, so a resumed run repeats the same steps."""
    sharding.maybe_initialize_distributed()
    settings = resolve(cfg)
    t = cfg.train
    process_count, process_index = jax.process_count(), jax.process_index()
    if t.batch_size % process_count:
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by the {process_count} processes")
    mesh = sharding.make_mesh(settings.mesh)
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_size % (batch_ways * t.grad_accum_steps):
        raise ConfigError(f"train.batch_size {t.batch_size} must be a multiple of the mesh's data x fsdp size "
                          f"{batch_ways} times train.grad_accum_steps {t.grad_accum_steps}")  # fmt: skip

    question_tokenizer, generator_tokenizer = tokenizers(cfg)
    train_examples = read_split(cfg, "train", generator_tokenizer)  # data mistakes show before the models load
    dev_examples = read_split(cfg, "dev") if cfg.data.dev else []
    model = build_model(cfg)
    closed_book = cfg.rag.variant == "closed_book"
    on_device = device_retrieval(cfg)
    retriever = None if closed_book else build_retriever(cfg, model, question_tokenizer, generator_tokenizer, k=cfg.rag.k,
                                                         mesh=mesh if on_device else None)  # fmt: skip
    corpus = components.device_corpus(cfg, retriever, progress=progress and process_index == 0) if on_device else None
    dev_format = split_format(cfg, "dev")
    # HF fast tokenizers are not thread-safe: evaluation (main thread) gets its own, retrieval ahead
    # of the step (background thread) keeps the first pair.
    eval_question_tokenizer, eval_generator_tokenizer = tokenizers(cfg)
    eval_retriever = None if closed_book else dataclasses.replace(
        retriever, question_tokenizer=eval_question_tokenizer, generator_tokenizer=eval_generator_tokenizer)

    trainer = Trainer(model, settings.train, mesh, corpus_layout=corpus.layout if on_device else None)
    # end-to-end retriever training: the retrieved passages' tokens for the trained document encoder (one
    # tokenizer per thread: retrieval ahead of the step, evaluation, the re-index)
    doc_trained = settings.train.train_doc_encoder
    batch_doc_inputs = components.doc_inputs(cfg) if doc_trained else None
    eval_doc_inputs = components.doc_inputs(cfg) if doc_trained else None
    retrieve_k = t.rerank_candidates if t.index_refresh == "rerank" else None
    ckpt = checkpointing.Checkpointer(
        os.path.join(cfg.run_dir, "checkpoints"), save_every=t.save_every, keep=t.keep_checkpoints,
        best_metric=(t.best_metric or None) if dev_examples else None,
    )  # fmt: skip
    ckpt.write_config(cfg.to_dict())
    iterator = data.BatchIterator(len(train_examples), t.batch_size, seed=cfg.seed,
                                  process_index=process_index, process_count=process_count)  # fmt: skip
    restored = ckpt.restore(checkpoint_target(trainer))
    if restored is None:
        state, start = trainer.init_state(), 0
        snapshot = jax.tree.map(jnp.copy, state.params["query_encoder"])
    else:
        tree, data_state, start = restored
        state, snapshot = tree["train"], tree["retrieval_encoder"]
        iterator.restore(data_state["iterator"])
        log.info("resumed from the checkpoint of step %d in %s", start, ckpt.directory)
    # the encoder retrieval uses: a copy (the step donates its state), refreshed every R steps
    retrieval = {"snapshot": snapshot, "local": sharding.process_local(snapshot)}
    refresher = None
    if t.index_refresh == "full":
        refresher = reindex.run_refresher(cfg, trainer.doc_encoder, _doc_snapshot(trainer, state), retriever,
                                          components.doc_inputs(cfg))  # fmt: skip
        if restored is not None:
            refresher.resume(start, _restored_doc_snapshots(refresher.schedule, start, tree["doc_snapshots"]))

    def make_batch(chosen, retrieval_now):
        """The step's batch and its diagnostics (the distinct passages retrieved for it)."""
        if closed_book:
            return closed_book_batch(cfg, generator_tokenizer, chosen), {}
        if on_device:  # retrieved inside the step
            return questions_batch(cfg, retriever, generator_tokenizer, chosen), {}
        encoder_params, step_retriever = retrieval_now
        batch, distinct = rag_batch(cfg, step_retriever, generator_tokenizer, chosen, encoder_params,
                                    doc_inputs=batch_doc_inputs, k=retrieve_k)  # fmt: skip
        return batch, {"distinct_passages": distinct}

    def current_corpus(r, step: int):
        """``r`` over the corpus generation that retrieves for ``step`` (itself without a refresh)."""
        return r if refresher is None else r.with_corpus(r.store, *refresher.corpus_for(step))

    def evaluate_dev(params, step: int) -> dict:
        result, _ = evaluate(cfg, trainer.to_model(params), dev_examples, generator_tokenizer=eval_generator_tokenizer,
                             retriever=None if closed_book else current_corpus(eval_retriever, step + 1),
                             fmt=dev_format, progress=progress and process_index == 0,
                             doc_inputs=eval_doc_inputs, mesh=mesh)  # fmt: skip
        return result

    refresh_every = max(int(t.retrieval_refresh_every), 1)
    if closed_book or on_device or trainer.cfg.freeze_query_encoder:  # no host retrieval to refresh: run it ahead
        refresh_every = max(refresh_every, LOOKAHEAD_STEPS)

    def window_end(step: int) -> int:
        """The last step retrieved with the encoder and corpus of step + 1: the end of its R-step window,
        or earlier, where the index generation changes."""
        end = (step // refresh_every + 1) * refresh_every
        return end if refresher is None else min(end, refresher.schedule.next_swap(step))

    def retrieval_for(step: int):
        return retrieval["local"], None if closed_book else current_corpus(retriever, step)

    writer = MetricWriter(cfg.run_dir, start_step=start)
    restore_signals = checkpointing.install_preemption_handler()
    batches = _step_batches(iterator, train_examples, make_batch, window_end, retrieval_for, start,
                            background=not isinstance(getattr(retriever, "index", None), ProcessShardedIndex))  # fmt: skip
    skipped, dev_metrics, step = 0, {}, start
    bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", disable=not progress or process_index != 0)
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < t.steps:
            item = next(batches)
            batch, batch_metrics = item.future.result()
            state, step_metrics = trainer.train_step(state, batch, corpus.arrays if on_device else None)
            step += 1
            window_steps += 1
            if step % refresh_every == 0:
                retrieval["snapshot"] = jax.tree.map(jnp.copy, state.params["query_encoder"])
                retrieval["local"] = sharding.process_local(retrieval["snapshot"])
            if refresher is not None:
                refresher.after_step(step, lambda: _doc_snapshot(trainer, state))
            if bool(step_metrics["nonfinite"]):
                where = ", ".join(ex.where for ex in item.examples[:8])
                if t.on_nonfinite != "skip":
                    raise NonFiniteLossError(f"non-finite loss or gradient at step {step} (batch examples {where}); "
                                             f"the last good checkpoint is kept in {ckpt.directory}; "
                                             "train.on_nonfinite=skip skips such steps instead")  # fmt: skip
                skipped += 1
                log.warning("step %d: non-finite loss or gradient, update skipped (batch examples %s)", step, where)
            if step % t.log_every == 0 or step == t.steps:
                rate = window_steps * t.batch_size / max(time.perf_counter() - window_start, 1e-9)
                loss = float(step_metrics["loss"])
                logged = {"loss": loss, "grad_norm": float(step_metrics["grad_norm"]), "examples_per_s": rate,
                          "skipped_steps": skipped, **batch_metrics}  # fmt: skip
                for name in ("retrieval_entropy", "distinct_passages"):  # computed in the step
                    if name in step_metrics:
                        logged[name] = float(step_metrics[name])
                if refresher is not None:  # seconds so far: building generations (background), waiting for them
                    logged.update(reindex_build_s=refresher.build_seconds, reindex_wait_s=refresher.wait_seconds,
                                  index_generation=refresher.current)  # fmt: skip
                writer.write(step, logged, prefix="train")
                bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:.1f}")
                window_start, window_steps = time.perf_counter(), 0
            bar.update(1)
            evaluating = bool(dev_examples) and (step % t.eval_every == 0 or step == t.steps)
            if evaluating:
                dev_metrics = evaluate_dev(state.params, step)
                writer.write(step, dev_metrics, prefix="dev")
                log.info("step %d dev %s", step, dev_metrics)
            stop = _any_process(checkpointing.preempted())
            tree = {"train": state, "retrieval_encoder": retrieval["snapshot"]}
            data_state = {"iterator": item.data_state}
            if refresher is not None:  # the generations in use and being built, with their snapshots
                tree["doc_snapshots"] = refresher.checkpoint_snapshots(step)
                data_state["index_generation"] = refresher.schedule.generation_for(step + 1)
            ckpt.save(step, tree, data_state, dev_metrics if evaluating else None,
                      force=step == t.steps or stop)  # fmt: skip
            if stop:
                log.warning("pre-empted (SIGTERM): checkpoint saved at step %d, exiting", step)
                break
    finally:
        batches.close()
        if refresher is not None:
            refresher.close()
        bar.close()
        restore_signals()
        writer.close()
        ckpt.close()
    return dev_metrics
