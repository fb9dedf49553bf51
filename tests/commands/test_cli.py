"""The rag-jax command: info and convert on a saved tiny RAG folder."""

import json

from tiny_models import RAG_CLASSES, tiny_rag

from rag_jax.cli import main


def test_info_and_convert(tmp_path, capsys):
    tiny_rag("sequence").save_pretrained(tmp_path / "rag")
    assert main(["info", str(tmp_path / "rag")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["type"] == "RagModel" and info["variant"] == "sequence"
    assert info["question_encoder"]["kind"] == "dpr_question"
    assert main(["convert", str(tmp_path / "rag"), str(tmp_path / "out")]) == 0
    _, loading = RAG_CLASSES["sequence"].from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
