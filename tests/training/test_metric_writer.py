"""The metric writer: JSONL and TensorBoard, silent on other processes, resume drops later records."""

from rag_jax.training.metric_writer import MetricWriter, read_metrics


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
