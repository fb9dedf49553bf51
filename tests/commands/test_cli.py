"""The rag-jax command: info and convert on a saved tiny RAG folder; the log level."""

import json
import logging

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
