"""The rag-jax command: info and convert on a saved tiny RAG folder; the log level."""

import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
from tiny_models import RAG_CLASSES, tiny_rag

from rag_jax.cli import main
from rag_jax.commands.logs import verbose_level


def test_info_and_convert(tmp_path, capsys):
    tiny_rag("sequence").save_pretrained(tmp_path / "rag")
    assert main(["info", str(tmp_path / "rag")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["type"] == "RagModel" and info["variant"] == "sequence"
    assert info["question_encoder"]["kind"] == "dpr_question"
    assert main(["convert", str(tmp_path / "rag"), str(tmp_path / "out")]) == 0
    _, loading = RAG_CLASSES["sequence"].from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading


def test_log_level_from_the_flag_or_the_environment():
    assert verbose_level(False, {}) is None  # quiet: rag_jax at INFO, the libraries hushed
    assert verbose_level(True, {}) == logging.INFO
    assert verbose_level(False, {"RAG_JAX_LOG_LEVEL": "debug"}) == logging.DEBUG
    assert verbose_level(True, {"RAG_JAX_LOG_LEVEL": "WARNING"}) == logging.WARNING
    with pytest.raises(ValueError, match="RAG_JAX_LOG_LEVEL='LOUD' is not a logging level"):
        verbose_level(False, {"RAG_JAX_LOG_LEVEL": "loud"})


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_quiet_logging_hides_libtpu_start_up_notes_on_a_host_without_a_tpu():
    code = "from rag_jax.commands import logs; logs.configure(None); import jax; print(jax.devices()[0].platform)"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "cpu", done.stderr[-2000:]
    assert "TPU_WORKER_HOSTNAMES" not in done.stderr and "accelerator type" not in done.stderr, done.stderr[-2000:]
