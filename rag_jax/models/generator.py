"""The RAG generator: a ``Bart`` with its config, loaded from and saved to transformers folders."""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
from flax import nnx

from rag_jax.config import BartConfig
from rag_jax.convert.bart import bart_from_hf, bart_state_to_hf
from rag_jax.convert.common import model_folder, read_config, read_state_dict, write_config, write_state_dict
from rag_jax.models.bart import Bart

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
"""Files copied next to an exported generator when its source folder has them."""


def _logits(graphdef, state, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
    model = nnx.merge(graphdef, state)
    return model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)


@dataclasses.dataclass
class Generator:
    """A BART generator.

    ``hf_config`` is the ``config.json`` it was loaded from (kept so an export preserves fields
    ``BartConfig`` does not model); ``source_path`` the folder, whose tokenizer files an export copies.
    """

    model: Bart
    config: BartConfig
    hf_config: dict | None = None
    source_path: str | None = None
    _logits_jit: object = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _split: tuple = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def split(self) -> tuple[nnx.GraphDef, nnx.State]:
        """``nnx.split(self.model)``, traversed once per model (the traversal is milliseconds of Python per
        call, a large part of a small model's generate call). The state holds the model's own Variables,
        so values changed in place (``nnx.update``, ``variable[...] = x``, training) are seen; assigning a
        new ``model`` is seen too. Replacing a submodule or Variable inside the model is not: make a new
        ``Generator`` for that."""
        if self._split is None or self._split[0] is not self.model:
            self._split = (self.model, *nnx.split(self.model))
        return self._split[1:]

    def logits(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None) -> jax.Array:
        """Float32 ``[B, T, V]`` logits of a deterministic forward pass, jitted (compiled once per shape)."""
        if self._logits_jit is None:
            self._logits_jit = jax.jit(_logits)
        graphdef, state = self.split()
        return self._logits_jit(graphdef, state, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)


def load_generator(path: str, *, dtype=None, param_dtype=jnp.float32, remat: bool = False) -> Generator:
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
