"""Run configs: get_config files, typed overrides, unknown fields refused (in overrides, config files and
edits), and the typed views resolve() builds."""


import pytest

from rag_jax.config import (
    UnknownFieldError,
    apply_override,
    default_config,
    load_config,
    reference_recipe,
    resolve,
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
                                                   ("train", "compute_dtype", "float16"), ("train", "form", "torch")])
def test_resolve_refuses_values_outside_their_choices(section, field, value):
    with pytest.raises(ValueError, match=rf"config.{section}.{field}: must be one of .*; got '{value}'"):
        resolve(with_changes(default_config(), **{section: {field: value}}))
    with pytest.raises(ValueError, match="grad_accum_steps: must be >= 1"):
        resolve(with_changes(default_config(), train={"grad_accum_steps": 0}))

