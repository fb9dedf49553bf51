"""The generator from and to a transformers ``BartForConditionalGeneration`` folder."""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp

from rag_jax.hf.bart import bart_from_hf, bart_state_to_hf
from rag_jax.hf.io import model_folder, read_config, read_state_dict, write_config, write_state_dict
from rag_jax.models.configs import BartConfig
from rag_jax.models.generator import Generator

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
"""Files copied next to an exported generator when its source folder has them."""


def load_generator(path: str, *, dtype=None, param_dtype=jnp.float32, remat: str = "none") -> Generator:
    """Load a transformers ``BartForConditionalGeneration`` folder (config.json + weights), strictly;
    a hub id is downloaded where the network allows."""
    path = model_folder(path)
    hf_config = read_config(path)
    cfg = BartConfig.from_hf(hf_config)
    model = bart_from_hf(read_state_dict(path), cfg, dtype=dtype, param_dtype=param_dtype, remat=remat)
    return Generator(model=model, config=cfg, hf_config=hf_config, source_path=path)


def hf_config_dict(generator: Generator) -> dict:
    """The ``config.json`` of an export: the source config updated with the current ``BartConfig``."""
    config = dict(generator.hf_config or {})
    config.update(generator.config.to_hf_dict())
    config.setdefault("model_type", "bart")
    config.setdefault("architectures", ["BartForConditionalGeneration"])
    config.setdefault("is_encoder_decoder", True)
    return config


def save_generator_hf(generator: Generator, path: str) -> None:
    """Write a folder that ``BartForConditionalGeneration.from_pretrained`` loads with no missing or
    unexpected keys, with the source folder's tokenizer files when there are any."""
    write_config(hf_config_dict(generator), path)
    write_state_dict(bart_state_to_hf(generator.model), path)
    if generator.source_path is not None and os.path.abspath(generator.source_path) != os.path.abspath(path):
        for name in TOKENIZER_FILES:
            source = os.path.join(generator.source_path, name)
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(path, name))
