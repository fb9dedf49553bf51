"""Run configs: get_config files, typed overrides, unknown fields refused (in overrides, config files and
edits), and the typed views resolve() builds."""

import json

import pytest

from rag_jax.config import (
    UnknownFieldError,
    apply_override,
    default_config,
    load_config,
    reference_recipe,
    resolve,
    saved_run_config,
    with_changes,
)

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
     ("--config.rag.k=three", "expected int"), ("--config.train.freeze_query_encoder=maybe", "expected a boolean"),
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


def test_a_misspelt_field_in_a_config_file_is_an_error_naming_the_closest(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("from rag_jax.config import default_config\n\ndef get_config():\n    c = default_config()\n"
                    "    c.train.stepz = 7\n    return c\n")  # fmt: skip
    with pytest.raises(UnknownFieldError, match=rf"{path}: no field 'train.stepz' in the config; did you mean 'train.steps'"):
        load_config(str(path))


def test_a_misspelt_override_names_the_closest_field():
    with pytest.raises(UnknownFieldError, match="no field 'train.learning_rte'.*did you mean 'train.learning_rate'"):
        apply_override(default_config(), "--config.train.learning_rte=1e-3")


def test_with_changes_refuses_unknown_fields():
    assert with_changes(default_config(), train={"steps": 3}, seed=2).train.steps == 3
    with pytest.raises(UnknownFieldError, match="no field 'train.step'"):
        with_changes(default_config(), train={"step": 3})


def test_resolve_builds_the_views_from_the_one_schema():
    config = default_config()
    settings = resolve(config)
    train, opt = settings.train, settings.train.optimizer
    assert (train.variant, train.epsilon, train.loss_reduction, train.form) == ("token", 0.1, "mean", "paper")
    assert (opt.learning_rate, opt.warmup_steps, opt.total_steps, opt.weight_decay, opt.clip_norm) == (
        3e-5, 500, config.train.steps, 0.001, 0.1)  # fmt: skip
    assert (settings.mesh.data, settings.mesh.fsdp, settings.mesh.model) == (-1, 1, 1)
    assert (settings.rag.n_docs, settings.rag.max_combined_length, settings.rag.prefix) == (5, 300, None)
    assert resolve(reference_recipe()).train.loss_reduction == "sum"
    bm25 = resolve(with_changes(config, corpus={"retriever": "bm25"}))
    assert bm25.train.freeze_query_encoder
    assert resolve(with_changes(config, train={"clip_norm": 0.0})).train.optimizer.clip_norm is None


@pytest.mark.parametrize("section, field, value", [("rag", "variant", "tokens"), ("train", "on_nonfinite", "ignore"),
                                                   ("train", "compute_dtype", "float16"), ("train", "form", "torch"),
                                                   ("train", "remat", "maybe")])
def test_resolve_refuses_values_outside_their_choices(section, field, value):
    with pytest.raises(ValueError, match=rf"config.{section}.{field}: must be one of .*; got '{value}'"):
        resolve(with_changes(default_config(), **{section: {field: value}}))
    with pytest.raises(ValueError, match="grad_accum_steps: must be >= 1"):
        resolve(with_changes(default_config(), train={"grad_accum_steps": 0}))



def test_remat_policies_and_the_old_flag(tmp_path):
    """``train.remat`` names a policy; True / False (a config file, a saved run or an override written
    when it was a flag) still mean "full" / "none"."""
    assert resolve(default_config()).train.remat == "none"
    for value, policy in ((True, "full"), (False, "none"), ("dots_saveable", "dots_saveable")):
        assert resolve(with_changes(default_config(), train={"remat": value})).train.remat == policy
    no_batch_dims = "dots_with_no_batch_dims_saveable"
    for text, policy in (("true", "full"), ("False", "none"), (no_batch_dims, no_batch_dims)):
        config = default_config()
        apply_override(config, f"--config.train.remat={text}")
        assert resolve(config).train.remat == policy
    saved = default_config().to_dict()
    saved["train"]["remat"] = True
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "config.json").write_text(json.dumps(saved))
    assert resolve(saved_run_config(str(tmp_path))).train.remat == "full"


def test_score_scale_settings():
    """``rag.score_scale`` (None: automatic) must be positive; ``rag.learn_score_scale`` applies to dense
    RAG only; a run saved before the scale existed reads back with the scale it trained with, 1."""
    config = default_config()
    assert resolve(config).score_scale is None and not resolve(config).train.learn_score_scale
    learned = with_changes(config, rag={"score_scale": 20.0, "learn_score_scale": True},
                           train={"score_scale_learning_rate": 0.05})  # fmt: skip
    settings = resolve(learned)
    assert (settings.score_scale, settings.train.learn_score_scale, settings.train.score_scale_learning_rate) == (
        20.0, True, 0.05)  # fmt: skip
    for fixed_scores in ({"corpus": {"retriever": "bm25"}}, {"rag": {"variant": "closed_book"}}):
        assert not resolve(with_changes(learned, **fixed_scores)).train.learn_score_scale
    assert apply_override(config, "--config.rag.score_scale=5") is None and config.rag.score_scale == 5.0
    with pytest.raises(ValueError, match="rag.score_scale: must be positive"):
        resolve(with_changes(default_config(), rag={"score_scale": 0.0}))


def test_a_run_saved_before_the_score_scale_reads_back_unscaled(tmp_path):
    saved = default_config().to_dict()
    del saved["rag"]["score_scale"], saved["rag"]["learn_score_scale"]
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "config.json").write_text(json.dumps(saved))
    assert saved_run_config(str(tmp_path)).rag.score_scale == 1.0
    saved["rag"]["score_scale"] = None  # automatic, as saved since
    (tmp_path / "checkpoints" / "config.json").write_text(json.dumps(saved))
    assert saved_run_config(str(tmp_path)).rag.score_scale is None


@pytest.mark.parametrize("dataset", ["nq", "tqa", "wq", "ct", "msmarco", "jeopardy", "fever3", "fever2"])
@pytest.mark.parametrize("variant", ["token", "sequence", "closed_book"])
def test_every_paper_config_loads_and_resolves(dataset, variant):
    config = load_config(f"experiments/configs/paper.py:{dataset}-{variant}@/data/rag")
    settings = resolve(config)
    folder = "fever" if dataset.startswith("fever") else dataset
    assert settings.train.variant == variant and config.data.train.startswith(f"/data/rag/{folder}/train.")
    assert config.eval.answer_match == ("regex" if dataset == "ct" else "string")
    assert config.data.labels == ("SUPPORTS,REFUTES" if dataset == "fever2" else "")
    # appendix B: QA tested with 15 (RAG-Token) / 50 (RAG-Sequence) documents, greedy; MS-MARCO and Jeopardy
    # with 10 documents, beam 4, fast RAG-Sequence decoding
    generation = dataset in ("msmarco", "jeopardy")
    test_docs = {"token": 10, "sequence": 10} if generation else {"token": 15, "sequence": 50}
    if dataset.startswith("fever"):
        test_docs = {"token": 5, "sequence": 10}
    assert config.eval.k == test_docs.get(variant, 0)
    assert (config.eval.num_beams, config.eval.decoding) == ((4, "fast") if generation else (1, "thorough"))
