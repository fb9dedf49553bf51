"""Run configs: get_config files, typed overrides, unknown fields refused; the metric writer."""


import pytest

from rag_jax.config import apply_override, default_config, load_config
from rag_jax.training.metric_writer import MetricWriter, read_metrics

CONFIG_FILE = '''
from rag_jax.config import default_config

def get_config(arg="token"):
    c = default_config()
    c.rag.variant = arg
    c.train.steps = 7
    return c
'''


def test_load_config_with_arg_and_overrides(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(CONFIG_FILE)
    cfg = load_config(f"{path}:sequence", ["--config.rag.k=10", "--config.train.learning_rate=1e-3",
                                            "--config.train.freeze_query_encoder=true", "--config.run_dir=/x"])  # fmt: skip
    assert cfg.rag.variant == "sequence" and cfg.train.steps == 7
    assert cfg.rag.k == 10 and isinstance(cfg.rag.k, int)
    assert cfg.train.learning_rate == 1e-3 and cfg.train.freeze_query_encoder is True
    assert cfg.run_dir == "/x"
    assert load_config(str(path)).rag.variant == "token"


@pytest.mark.parametrize(
    "override, error",
    [("--config.rag.kk=3", "no field 'rag.kk'"), ("--config.nope.k=3", "no field 'nope'"),
     ("--config.rag.k=three", "expected int"), ("--config.train.remat=maybe", "expected a boolean"),
     ("rag.k=3", "expected --config")],
)  # fmt: skip
def test_bad_overrides_are_named(override, error):
    with pytest.raises((KeyError, ValueError), match=error):
        apply_override(default_config(), override)


def test_missing_config_file_and_get_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "none.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(AttributeError, match="get_config"):
        load_config(str(tmp_path / "empty.py"))


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(1, {"loss": 2.5}, prefix="train")
    writer.write(2, {"em": 0.5}, prefix="dev")
    writer.close()
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["train/loss"] == 2.5 and records[1]["dev/em"] == 0.5
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    silent = MetricWriter(str(tmp_path / "other"), enabled=False)
    silent.write(1, {"loss": 1.0}, prefix="train")
    assert not (tmp_path / "other").exists()


def test_metric_writer_on_resume_drops_records_after_the_checkpoint(tmp_path):
    writer = MetricWriter(str(tmp_path))
    for step in (1, 2, 3, 4):
        writer.write(step, {"loss": float(step)}, prefix="train")
    writer.close()
    resumed = MetricWriter(str(tmp_path), start_step=2)  # the run resumed from the step-2 checkpoint
    resumed.write(3, {"loss": 30.0}, prefix="train")
    resumed.close()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(str(tmp_path))] == [(1, 1.0), (2, 2.0), (3, 30.0)]
