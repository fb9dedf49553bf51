"""Checkpoints: bitwise-exact resume, restore across meshes (1 <-> 8 devices), keep-last-N plus
best, damaged checkpoints, the NaN guard, the run config and the pre-emption flag."""

import dataclasses
import logging
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_train import V, _batch, _cfg

from rag_jax.config import MeshConfig, read_run_config
from rag_jax.models.configs import BartConfig, BertConfig
from rag_jax.rag.model import init_rag_model
from rag_jax.training import checkpointing, sharding
from rag_jax.training.checkpointing import STATE_ITEM, Checkpointer
from rag_jax.training.step import Trainer, TrainState

SAVE_STEP, LAST_STEP = 3, 5  # the run saves at step 3 only (save_every=3) and trains on to step 5


def _host(tree):
    """Host copies (not views) of every leaf."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def model():
    """One-layer encoders with dropout 0.1 (the train step compiles in seconds); test_train's batches."""
    dropout = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    bert = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                      max_position_embeddings=16, **dropout)  # fmt: skip
    bart = BartConfig(
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=16,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
    )  # fmt: skip
    return init_rag_model(bert, bart, seed=0)


def _closed_book_trainer(model, mesh=None):
    return Trainer(model, _cfg(variant="closed_book"), mesh=mesh)


def _train(trainer, state, first_step, last_step, checkpointer=None):
    """Steps first_step..last_step (batch of step s: seed s); returns (state, per-step losses, saved states)."""
    losses, saved = [], {}
    for step in range(first_step, last_step + 1):
        state, metrics = trainer.train_step(state, _batch(seed=step, closed_book=True))
        losses.append(float(metrics["loss"]))
        if checkpointer is not None and step % SAVE_STEP == 0:
            saved[step] = _host(state)
            assert checkpointer.save(step, state, {"next_batch_seed": step + 1}, {"loss": losses[-1]})
    return state, losses, saved


@pytest.fixture(scope="module")
def run(tmp_path_factory, model):
    """A closed-book run with dropout on 1 device: async checkpoint at step 3, then on to step 5."""
    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    trainer = _closed_book_trainer(model)
    with Checkpointer(directory, save_every=SAVE_STEP, keep=2) as ckpt:
        state, losses, saved = _train(trainer, trainer.init_state(), 1, LAST_STEP, ckpt)
    return {"directory": directory, "losses": losses, "saved": saved[SAVE_STEP], "final": _host(state)}


def test_resume_is_bitwise_exact(run, model):
    """Restore step 3 in a fresh Trainer and train to step 5 again: same losses, same parameters.
    The step-3 checkpoint was written asynchronously while the next steps donated the state's
    buffers, and still holds exactly the step-3 state."""
    trainer = _closed_book_trainer(model)
    ckpt = Checkpointer(run["directory"], save_every=SAVE_STEP, keep=2)
    state, data_state, step = ckpt.restore(trainer.abstract_state())
    assert (step, data_state) == (SAVE_STEP, {"next_batch_seed": SAVE_STEP + 1})
    assert ckpt.metrics(step) == {"loss": run["losses"][SAVE_STEP - 1]}
    _assert_bitwise_equal(state, run["saved"])
    state, losses, _ = _train(trainer, state, data_state["next_batch_seed"], LAST_STEP)
    assert losses == run["losses"][SAVE_STEP:]
    _assert_bitwise_equal(state, run["final"])
    ckpt.close()


def test_restore_across_meshes(run, model, tmp_path):
    """Saved on 1 device -> restored on 8 (data=2 x fsdp=4) and the reverse, bitwise, each leaf in
    the target layout."""
    mesh8 = sharding.make_mesh(MeshConfig(data=2, fsdp=4, model=1))
    abstract8 = _closed_book_trainer(model, mesh8).abstract_state()
    abstract1 = _closed_book_trainer(model).abstract_state()
    fc1 = abstract8.params["generator"]["encoder"]["layers"]["fc1"]["kernel"]
    assert fc1.sharding.spec == P(None, "fsdp", None)  # the restore target really is sharded (embed 16 over fsdp 4)

    with Checkpointer(run["directory"], save_every=SAVE_STEP, keep=2, read_only=True) as ckpt:
        state8, data_state, step = ckpt.restore(abstract8, step=SAVE_STEP)
    _assert_bitwise_equal(state8, run["saved"])
    for leaf, target in zip(jax.tree.leaves(state8), jax.tree.leaves(abstract8)):
        assert leaf.sharding == target.sharding

    with Checkpointer(tmp_path / "from8", save_every=1, keep=1, async_save=False) as ckpt:
        assert ckpt.save(step, state8, data_state)
        state1, _, _ = ckpt.restore(abstract1)
    _assert_bitwise_equal(state1, run["saved"])
    for leaf, target in zip(jax.tree.leaves(state1), jax.tree.leaves(abstract1)):
        assert leaf.sharding == target.sharding and len(leaf.sharding.device_set) == 1


# -- small hand-made states for the bookkeeping tests ---------------------------------------------


def _state(value: float) -> TrainState:
    w = jnp.full((4, 3), value, jnp.float32) + jnp.arange(3.0)[None, :]
    return TrainState(step=jnp.asarray(int(value), jnp.int32), params={"w": w}, opt_state={"mu": 2 * w},
                      rng=jnp.zeros(2, jnp.uint32))  # fmt: skip


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.mark.parametrize("best_mode", ["max", "min"])
def test_keeps_last_n_and_best_across_restarts(tmp_path, best_mode):
    sign = 1.0 if best_mode == "max" else -1.0
    scores = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.2, 5: 0.4, 6: 0.5}  # step 2 is the best
    kw = {"save_every": 1, "keep": 2, "best_metric": "score", "best_mode": best_mode}
    with Checkpointer(tmp_path, **kw) as ckpt:
        for step, score in scores.items():
            assert ckpt.save(step, _state(step), {}, {"score": sign * score, "loss": 1.0})
        ckpt.wait()
        assert (ckpt.all_steps(), ckpt.best_step()) == ([2, 5, 6], 2)
    with Checkpointer(tmp_path, **kw) as ckpt:  # the best is known from disk after a restart
        assert ckpt.save(7, _state(7), {}, {"score": sign * 0.05})
        assert ckpt.save(8, _state(8), {})  # no metrics: only the keep-last rule applies to it
        ckpt.wait()
        assert ckpt.all_steps() == [2, 7, 8]
        assert ckpt.metrics(2) == {"score": sign * 0.9, "loss": 1.0}


def test_save_decides_and_validates(tmp_path):
    with Checkpointer(tmp_path, save_every=2, keep=3, best_metric="em", async_save=False) as ckpt:
        assert not ckpt.save(1, _state(1), {})  # not a save step
        assert ckpt.save(1, _state(1), {}, force=True)  # e.g. pre-emption
        assert ckpt.save(2, _state(2), {})
        assert not ckpt.save(2, _state(2), {}, force=True)  # never overwritten
        with pytest.raises(ValueError, match="best_metric 'em'"):
            ckpt.save(4, _state(4), {}, {"loss": 1.0})
        with pytest.raises(TypeError, match="data_state must be JSON"):
            ckpt.save(4, _state(4), {"encoder": np.zeros(3)})
        assert ckpt.all_steps() == [1, 2]


def test_nan_state_is_never_saved(tmp_path, caplog):
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        assert ckpt.save(1, _state(1), {"pos": 1})
        diverged = _state(2)
        diverged.params["w"] = diverged.params["w"].at[0, 0].set(jnp.nan)
        with caplog.at_level(logging.WARNING, logger="rag_jax.training.checkpointing"):
            assert not ckpt.save(2, diverged, {"pos": 2}, force=True)
        assert "step 2" in caplog.text and "params/w" in caplog.text and "opt_state/mu" not in caplog.text
        ckpt.wait()
        assert ckpt.all_steps() == [1]
        state, data_state, step = ckpt.restore(_abstract(_state(0)))
    assert (step, data_state) == (1, {"pos": 1})
    _assert_bitwise_equal(state, _state(1))


def _damage(step_dir, how):
    files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names]
    if how == "truncated":
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    elif how == "array data deleted":
        for f in files:
            if os.path.basename(os.path.dirname(f)) == "d":  # OCDBT data files
                os.remove(f)
    elif how == "data state deleted":
        os.remove(os.path.join(step_dir, "data", "metadata"))


@pytest.mark.parametrize("how", ["truncated", "array data deleted", "data state deleted"])
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, caplog, how):
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _state(step), {"pos": step})
    _damage(tmp_path / "2", how)
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        with caplog.at_level(logging.WARNING, logger="rag_jax.training.checkpointing"):
            state, data_state, step = ckpt.restore(_abstract(_state(0)))
        assert "checkpoint step 2" in caplog.text and "unreadable" in caplog.text
        assert (step, data_state) == (1, {"pos": 1})
        _assert_bitwise_equal(state, _state(1))
        assert ckpt.all_steps() == [1]  # the damaged step was moved aside, so step 2 can be saved again
        assert [p.name.startswith("2.corrupt-") for p in tmp_path.iterdir() if p.name.startswith("2")] == [True]
        assert ckpt.save(2, _state(2), {"pos": 2})


def test_truncated_array_data_is_found_before_orbax_reads_it(tmp_path, monkeypatch):
    """A restore that fails inside orbax leaves reads in flight whose completions hit a closed event loop
    ("Event loop is closed" tracebacks from background threads), so a step whose array data is damaged
    must be recognised before orbax restores it."""
    keys = jax.random.split(jax.random.key(0), 4)
    state = {f"a{i}": jax.random.normal(k, (64, 64)) for i, k in enumerate(keys)}  # over OCDBT's inline size
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {name: x + step for name, x in state.items()}, {"pos": step})
    data_files = list((tmp_path / "2" / STATE_ITEM / "ocdbt.process_0" / "d").iterdir())
    largest = max(data_files, key=lambda f: f.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)
    assert "stored array chunk(s) cannot be read" in checkpointing.array_data_problem(tmp_path / "2" / STATE_ITEM)
    assert checkpointing.array_data_problem(tmp_path / "1" / STATE_ITEM) is None
    restored = []
    restore_step = Checkpointer._restore_step
    monkeypatch.setattr(Checkpointer, "_restore_step", lambda self, *a: restored.append(a[1]) or restore_step(self, *a))
    with Checkpointer(tmp_path, save_every=1, keep=3, read_only=True) as ckpt:
        with pytest.raises(checkpointing.CheckpointRestoreError, match=r"/2\): \d+ of its \d+ stored array chunk"):
            ckpt.restore(_abstract(state), step=2)
        _, data_state, step = ckpt.restore(_abstract(state))
    assert (step, data_state, restored) == (1, {"pos": 1}, [1])


def test_unparsable_metrics_file_is_a_one_line_error(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=3, best_metric="em") as ckpt:
        for step in (1, 2):
            ckpt.save(step, _state(step), {"pos": step}, {"em": 0.5})
    metrics = tmp_path / "2" / "metrics" / "metrics"
    metrics.write_text(metrics.read_text()[:5])
    with pytest.raises(checkpointing.CheckpointRestoreError, match=rf"^checkpoint \({metrics}\): not valid JSON"):
        Checkpointer(tmp_path, save_every=1, keep=3, best_metric="em")


def test_unfinished_save_is_ignored_and_cleaned(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        ckpt.save(1, _state(1), {"pos": 1})
    partial = tmp_path / "2.orbax-checkpoint-tmp-1700000000"  # what a kill during a save leaves
    shutil.copytree(tmp_path / "1", partial)
    (partial / "state" / "_METADATA").write_text("{")
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        _, _, step = ckpt.restore(_abstract(_state(0)))
        assert step == 1
        assert ckpt.save(2, _state(2), {"pos": 2})  # the interrupted step saves normally
        ckpt.wait()
        assert not partial.exists() and ckpt.all_steps() == [1, 2]


def test_mismatched_state_is_an_error_not_damage(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _state(step), {})
        other = _abstract(_state(0))
        other.params["w"] = jax.ShapeDtypeStruct((5, 3), jnp.float32, sharding=other.params["w"].sharding)
        expected = r"params/w: stored \(4, 3\), expected \(5, 3\)"
        with pytest.raises(checkpointing.CheckpointMismatchError, match=expected):
            ckpt.restore(other)
        assert ckpt.all_steps() == [1, 2]
        with pytest.raises(FileNotFoundError, match="available: \\[1, 2\\]"):
            ckpt.restore(_abstract(_state(0)), step=3)
    with Checkpointer(tmp_path / "empty", save_every=1, keep=1) as ckpt:
        assert ckpt.restore(_abstract(_state(0))) is None


def test_run_config_round_trip(tmp_path):
    config = {"train": {"steps": 10, "lr": 3e-5}, "model": {"generator": "bart"}, "mesh": [1, 8, 1]}
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        path = ckpt.write_config(config)
        assert path == tmp_path / "config.json"
        assert ckpt.read_config() == config
        assert ckpt.save(1, _state(1), {})
        ckpt.wait()
        assert ckpt.all_steps() == [1]  # config.json is not mistaken for a step
    path.write_text('{"train": ')
    with pytest.raises(ValueError, match="config.json: invalid JSON at line 1"):
        read_run_config(path)


def test_sigterm_sets_the_preempted_flag():
    previous = signal.getsignal(signal.SIGTERM)
    restore_handlers = checkpointing.install_preemption_handler()
    try:
        assert not checkpointing.preempted()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not checkpointing.preempted() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert checkpointing.preempted()
    finally:
        restore_handlers()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_learned_score_scale_round_trips_through_a_checkpoint(model, tmp_path):
    """A learned score scale is part of the train state: saved, restored bitwise into the abstract state
    (replicated over 8 devices) and carried into the model ``to_model`` builds."""
    cfg = _cfg(rag={"learn_score_scale": True}, score_scale_learning_rate=0.1)
    trainer = Trainer(dataclasses.replace(model, score_scale=20.0), cfg)
    state = trainer.init_state()
    batch = _batch(seed=1)
    batch = dataclasses.replace(batch, doc_embeddings_BxKxD=batch.doc_embeddings_BxKxD[..., :16])  # hidden size 16
    for _ in range(2):  # the warmup's first learning rate is 0
        state, _ = trainer.train_step(state, batch)
    log_scale = float(state.params["score_scale"])
    assert log_scale != pytest.approx(np.log(20.0), abs=1e-4)
    saved = _host(state)
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        assert ckpt.save(2, state, {})
    mesh8 = sharding.make_mesh(MeshConfig(data=2, fsdp=4, model=1))
    restorer = Trainer(dataclasses.replace(model, score_scale=20.0), cfg, mesh8)
    with Checkpointer(tmp_path, save_every=1, keep=1, read_only=True) as ckpt:
        restored, _, step = ckpt.restore(restorer.abstract_state())
    assert step == 2
    _assert_bitwise_equal(restored, saved)
    assert restored.params["score_scale"].sharding.spec == P()
    assert restorer.to_model(restored.params).score_scale == pytest.approx(np.exp(log_scale), rel=1e-6)


def test_abstract_train_state_matches_init_state(model):
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4, model=1))
    trainer = _closed_book_trainer(model, mesh)
    abstract, state = trainer.abstract_state(), trainer.init_state()
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
        assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)
    assert isinstance(abstract.params["generator"]["shared"]["embedding"].sharding, NamedSharding)
