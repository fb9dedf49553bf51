"""Training checkpoints: an orbax ``CheckpointManager`` holding the train state, the data-iterator
state and the step's metrics, plus the run config, corruption fallback and pre-emption handling.

Layout of ``directory``::

    config.json          the resolved run config (``write_config`` / ``read_config``, ``rag_jax.config.read_run_config``)
    <step>/state/        the train state (orbax StandardSave: OCDBT + zarr, sharding-agnostic)
    <step>/data/         the data-iterator state (JSON)
    <step>/metrics/      the metrics given to ``save`` (JSON; absent when none were given)
    <step>.corrupt-<t>/  a step found unreadable by ``restore``, moved aside (never read again)

Conventions and guarantees:

* **Which steps are saved**: every ``save_every`` steps (``step % save_every == 0``), or any step with
  ``force=True`` (the final step, a pre-emption). A step already on disk is never overwritten.
* **Which are kept**: the last ``keep`` checkpoints, plus, when ``best_metric`` is set, the best one
  by that metric among the checkpoints saved with metrics (orbax ``LatestN`` + ``BestN(n=1)``
  preservation policies). Metrics are stored in the step, so the best is still known after a restart.
* **Never a NaN checkpoint**: ``save`` refuses (returns False and logs a warning naming the
  non-finite leaves) when any floating-point leaf of the state is NaN or infinite, so a diverged run
  cannot overwrite its last good checkpoint.
* **Restore** reads the state into an abstract state (``jax.ShapeDtypeStruct`` leaves carrying
  shardings, e.g. ``Trainer.abstract_state()``), so a checkpoint written on one mesh restores on
  any other (1 device <-> 8 devices). Without an explicit step it restores the latest *readable*
  checkpoint: a step whose files are truncated or missing is reported (warning naming the step),
  moved aside as ``<step>.corrupt-<time>`` once an older one restored, and the previous one is used.
  The array store is probed (``array_data_problem``) before orbax reads anything of a step: a read
  failing inside orbax (its metadata or its restore) leaves its other reads in flight, and their
  completions then hit a closed event loop (``RuntimeError: Event loop is closed`` tracebacks from
  background threads).
  Unfinished saves (orbax ``*.orbax-checkpoint-tmp-*`` directories left by a kill) are never listed
  as steps; a writable ``Checkpointer`` removes them in the background when it opens the directory.
* **Async saves and donation**: with ``async_save=True``, ``save`` returns once every array is in
  host memory (orbax's blocking phase transfers all arrays, ``np.asarray`` per shard, when no
  host-memory byte limit is configured, as here); only the file writes run in the background. The
  next ``train_step`` may therefore donate the state's buffers right away: on GPU/TPU the host copy
  is separate memory, and on CPU, where it is a zero-copy view, XLA declines to donate a buffer a
  view still references. ``wait()`` / ``close()`` (or the context manager) block until the writes
  are committed.
* **Pre-emption**: ``install_preemption_handler()`` makes SIGTERM set a flag (``preempted()``) that
  the training loop polls to save a final checkpoint and exit cleanly.

Single-process semantics are exact. Multi-host runs save and restore collectively through orbax;
the corruption fallback assumes every process sees the same files (a shared file system).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import checkpoint_managers as policies

from rag_jax.config import read_run_config
from rag_jax.errors import UserError
from rag_jax.training.sharding import path_str

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.json"
# Composite item names inside a step directory. "metrics" is the name orbax's CheckpointManager reads
# back (with a JSON handler whose file is also named "metrics") to rank steps after a restart.
STATE_ITEM, DATA_ITEM, METRICS_ITEM = "state", "data", "metrics"


class CheckpointRestoreError(UserError, RuntimeError):
    """Checkpoints exist but none of them is readable (or the one asked for is not)."""

    what = "checkpoint"


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's leaves (paths, shapes) differ from the state it is restored into."""

    what = "checkpoint"


class MissingCheckpointError(UserError, FileNotFoundError):
    """No checkpoint (or not the step asked for) in the directory."""

    what = "checkpoint"


# -- non-finite guard ----------------------------------------------------------------------------


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths ("/"-joined keys) of the floating-point leaves holding a NaN or an infinity."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    floats = [(path, x) for path, x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    if not floats:
        return []
    flags = np.asarray(_finite_flags([x for _, x in floats]))
    return [path_str(path) for (path, _), ok in zip(floats, flags) if not ok]


# -- the manager ---------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores training checkpoints in ``directory`` (see the module docstring).

    Args:
      directory: where the step directories and ``config.json`` live (created if missing).
      save_every: ``save`` writes when ``step % save_every == 0`` (or when forced).
      keep: how many of the most recent checkpoints to keep.
      best_metric: also keep the best checkpoint by this metric (a key of the ``metrics`` given to
        ``save``); None keeps only the last ``keep``.
      best_mode: "max" (higher is better, e.g. exact match) or "min" (e.g. a loss).
      async_save: write files in the background (arrays are on the host when ``save`` returns).
      read_only: never save, delete, clean up or move anything (for evaluating a live run's
        checkpoints).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int,
        best_metric: str | None = None,
        best_mode: Literal["max", "min"] = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.read_only = read_only
        latest = policies.LatestN(n=keep)
        if best_metric is None:
            preservation = latest
        else:
            best = policies.BestN(
                get_metric_fn=self._rank, reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False
            )
            preservation = policies.AnyPreservationPolicy([latest, best])
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=preservation,
            best_fn=None if best_metric is None else self._rank,  # ranks best_step(); metrics stored per step
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()  # lets a fresh manager read metadata
        for item, save_args, restore_args in (
            (STATE_ITEM, ocp.args.StandardSave, ocp.args.StandardRestore),
            (DATA_ITEM, ocp.args.JsonSave, ocp.args.JsonRestore),
        ):
            registry.add(item, save_args)
            registry.add(item, restore_args)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        except json.JSONDecodeError as e:  # orbax reads every step's metrics when it opens the directory
            bad = _unparsable_metrics(self.directory)
            raise CheckpointRestoreError(
                f"not valid JSON ({e.msg}); move its step folder aside (e.g. rename it <step>.corrupt) to use the "
                "earlier checkpoints", where=str(bad or self.directory),
            ) from e  # fmt: skip

    def _rank(self, metrics: Mapping[str, float] | None) -> float:
        """The best-metric value of a checkpoint's metrics; missing or non-finite ranks worst."""
        value = float("nan") if not metrics or self.best_metric not in metrics else float(metrics[self.best_metric])
        if math.isfinite(value):
            return value
        return -math.inf if self.best_mode == "max" else math.inf

    # -- queries ---------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The best step by ``best_metric`` (the latest step when no best metric is tracked)."""
        return self._manager.best_step()

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with ``step`` (None when it was saved without)."""
        return self._manager.metrics(step)

    # -- save ------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        data_state: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Checkpoint ``state`` after ``step`` if it is a save step (or ``force``); True if saved.

        ``state`` is a pytree of arrays: a ``TrainState``, or a dict holding one and other array state
        (e.g. a retrieval-encoder snapshot); ``restore`` returns the structure of its abstract state.
        ``data_state`` must be JSON-serialisable (the data iterator's position); ``metrics`` maps names
        to numbers and must hold ``best_metric`` when one is tracked.

        Returns False without writing when the step is not a save step, when a checkpoint of this
        step already exists, or when the state holds a NaN or infinity (logged as a warning with the
        offending leaves): the previous good checkpoint is never replaced by a diverged state.
        """
        step = int(step)
        if self.read_only:
            raise PermissionError(f"Checkpointer on {self.directory} is read-only")
        if step in self._manager.all_steps():
            log.info("checkpoint for step %d already exists in %s; not saved again", step, self.directory)
            return False
        if not force and not self._manager.should_save(step):
            return False
        data_json = _checked_json(data_state, "data_state")
        metrics_json = self._checked_metrics(metrics)
        bad = nonfinite_leaves(state)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            log.warning("step %d: state has non-finite values in %s; checkpoint NOT saved", step, shown)
            return False
        items = {STATE_ITEM: ocp.args.StandardSave(state), DATA_ITEM: ocp.args.JsonSave(data_json)}
        if metrics_json is not None:
            items[METRICS_ITEM] = ocp.args.JsonSave(metrics_json)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics_json, force=True)
        if saved:
            log.info("saved the checkpoint of step %d in %s", step, self.directory)
        return saved

    def _checked_metrics(self, metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
        if not metrics:
            return None
        try:
            metrics_json = {str(k): float(v) for k, v in metrics.items()}
        except (TypeError, ValueError) as e:
            raise TypeError(f"metrics must map names to numbers, got {dict(metrics)!r}") from e
        if self.best_metric is not None and self.best_metric not in metrics_json:
            raise ValueError(
                f"metrics {sorted(metrics_json)} lack best_metric {self.best_metric!r}; pass metrics=None for a "
                "checkpoint that should not compete for best"
            )
        return metrics_json

    # -- restore ---------------------------------------------------------------------------------

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
        """``(state, data_state, step)`` from checkpoint ``step``, or from the latest readable one.

        ``abstract_state`` gives the structure, shapes, dtypes and shardings to restore into
        (e.g. ``Trainer.abstract_state()``). Returns None when the directory holds no checkpoint.
        Raises ``CheckpointMismatchError`` when a checkpoint's leaves (paths and shapes) differ from
        the abstract state's (a changed model or optimizer config): that is never treated as damage.
        Without ``step``, an unreadable checkpoint (truncated or missing files) is skipped with a
        warning naming it, and moved aside once an older one restored; if none restores, raises
        ``CheckpointRestoreError`` and moves nothing. With ``step``, errors propagate.
        """
        self._manager.wait_until_finished()
        self._manager.reload()
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise MissingCheckpointError(f"no step {step}; available: {steps}", where=str(self.directory))
            self._check_array_data(step)
            self._check_compatible(abstract_state, step, self._stored_shapes(step))
            return self._restore_step(abstract_state, step)
        failed: dict[int, Exception] = {}
        for candidate in reversed(steps):
            try:
                self._check_array_data(candidate)
                stored = self._stored_shapes(candidate)
            except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types for missing or truncated files)
                failed[candidate] = self._report_unreadable(candidate, e, steps)
                continue
            self._check_compatible(abstract_state, candidate, stored)
            try:
                restored = self._restore_step(abstract_state, candidate)
            except Exception as e:  # noqa: BLE001
                failed[candidate] = self._report_unreadable(candidate, e, steps)
                continue
            for bad_step in failed:
                self._quarantine(bad_step)
            return restored
        if failed:
            summary = "; ".join(f"step {s}: {_reason(e)}" for s, e in failed.items())
            raise CheckpointRestoreError(
                f"none is readable ({summary}); move the damaged step folders aside or use another run_dir",
                where=str(self.directory),
            ) from next(iter(failed.values()))
        return None

    def _report_unreadable(self, step: int, error: Exception, steps: list[int]) -> Exception:
        """Warn that ``step`` is skipped (not for the oldest: the error raised then names every step)."""
        if step != steps[0]:
            log.warning("checkpoint step %d in %s is unreadable (%s); trying the previous one", step, self.directory,
                        _reason(error))  # fmt: skip
        return error

    def _stored_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """Leaf path -> shape of the state stored at ``step`` (from orbax's metadata)."""
        metadata = self._manager.item_metadata(step)[STATE_ITEM]
        if metadata is None:
            raise FileNotFoundError(f"step {step} has no readable {STATE_ITEM!r} metadata")
        return {path_str(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(metadata)}

    def _check_compatible(self, abstract_state: Any, step: int, stored: dict[str, tuple[int, ...]]) -> None:
        wanted = {path_str(path): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
        problems = [f"missing {p}" for p in sorted(wanted.keys() - stored.keys())]
        problems += [f"unexpected {p}" for p in sorted(stored.keys() - wanted.keys())]
        problems += [
            f"{p}: stored {stored[p]}, expected {wanted[p]}" for p in sorted(wanted.keys() & stored.keys())
            if stored[p] != wanted[p]
        ]  # fmt: skip
        if problems:
            shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            raise CheckpointMismatchError(
                f"step {step} does not match the state to restore into (was the model or optimizer config "
                f"changed?): {shown}", where=str(self.directory),
            )  # fmt: skip

    def _check_array_data(self, step: int) -> None:
        problem = array_data_problem(self.directory / str(step) / STATE_ITEM)
        if problem:
            raise CheckpointRestoreError(problem, where=str(self.directory / str(step)))

    def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, dict, int]:
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state), DATA_ITEM: ocp.args.JsonRestore()}
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE_ITEM], dict(restored[DATA_ITEM]), step

    def _quarantine(self, step: int) -> None:
        """Move an unreadable step directory aside (its name no longer parses as a step)."""
        if self.read_only:
            return
        source = self.directory / str(step)
        target = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            source.rename(target)
            log.warning("moved unreadable checkpoint %s to %s", source, target)
        ocp.multihost.sync_global_processes(f"rag_jax_checkpoint_quarantine_{step}")
        self._manager.reload()

    # -- config ----------------------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Write the resolved run config as ``config.json`` in the checkpoint directory (atomically,
        replacing an earlier one; process 0 only). Returns the path."""
        path = self.directory / CONFIG_FILENAME
        text = json.dumps(_checked_json(config, "config"), indent=2, sort_keys=True) + "\n"
        if jax.process_index() == 0:
            tmp = path.with_name(f".{CONFIG_FILENAME}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
        return path

    def read_config(self) -> dict:
        """The config written by ``write_config``."""
        return read_run_config(self.directory / CONFIG_FILENAME)

    # -- lifecycle -------------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until background saves are committed (and raise if one failed)."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    def close(self) -> None:
        """Finish background saves and release orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _checked_json(value: Mapping[str, Any], what: str) -> dict:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from e
    return dict(value)


def array_data_problem(state_dir: Path) -> str | None:
    """Why the arrays of ``state_dir`` (an orbax state item: an OCDBT store) cannot all be read, e.g.
    a data file truncated or deleted; None when every stored value can.

    Reads the last byte of every value (one that fails is read whole, since an empty value has no
    last byte) and waits for every read, so no read is left in flight."""
    if not (state_dir / "manifest.ocdbt").is_file():
        return "its array store has no manifest.ocdbt"
    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": f"{state_dir}/"}}).result()
        keys = store.list().result()
    except Exception as e:  # noqa: BLE001 (tensorstore reports damaged files as ValueError or OSError)
        return f"its array store cannot be listed ({type(e).__name__}: {_first_line(e)})"
    probes = [store.read(key, byte_range=slice(-1, None)) for key in keys]
    bad = [key.decode() for key, probe in zip(keys, probes) if not (_succeeds(probe) or _succeeds(store.read(key)))]
    if not keys or bad:
        first = f", the first: {bad[0]}" if bad else ""
        return f"{len(bad)} of its {len(keys)} stored array chunk(s) cannot be read (truncated or missing files){first}"
    return None


def _succeeds(read: ts.Future) -> bool:
    try:
        return read.result().state == "value"
    except Exception:  # noqa: BLE001 (tensorstore reports a short or missing file as ValueError or OSError)
        return False


def _unparsable_metrics(directory: Path) -> Path | None:
    """The first step's metrics file in ``directory`` that is not valid JSON."""
    for path in sorted(directory.glob(f"*/{METRICS_ITEM}/{METRICS_ITEM}")):
        try:
            json.loads(path.read_text())
        except (ValueError, OSError):
            return path
    return None


def _reason(e: BaseException) -> str:
    """Why a step is unreadable, in one line."""
    return e.why if isinstance(e, UserError) else f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


# -- pre-emption ---------------------------------------------------------------------------------

_preempted = threading.Event()


def install_preemption_handler(signals: Sequence[int] = (signal.SIGTERM,)) -> Callable[[], None]:
    """Make ``signals`` (SIGTERM: the usual pre-emption notice) set the flag ``preempted()`` instead
    of killing the process, so the training loop can save a final checkpoint and exit cleanly.
    Clears the flag. Must be called from the main thread. Returns a function that restores the
    previous handlers."""
    _preempted.clear()
    previous = {signum: signal.getsignal(signum) for signum in signals}

    def handler(signum, frame):  # no logging here: a signal can interrupt a write to the same stream
        _preempted.set()

    for signum in signals:
        signal.signal(signum, handler)

    def restore_previous() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)

    return restore_previous


def preempted() -> bool:
    """True once a signal registered by ``install_preemption_handler`` has arrived."""
    return _preempted.is_set()
