"""The RAG generator: a ``Bart`` with its config (``rag_jax.hf.generator`` loads and saves transformers folders)."""

from __future__ import annotations

import dataclasses
import weakref

import jax
from flax import nnx

from rag_jax.models.bart import Bart, unstacked_decoder
from rag_jax.models.configs import BartConfig


def _logits(graphdef, state, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
    model = nnx.merge(graphdef, state)
    return model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)


def _ref(x):
    """A weak reference to ``x`` where it takes one (jax arrays), else a strong one (numpy arrays)."""
    try:
        return weakref.ref(x)
    except TypeError:
        return lambda: x


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
    _decode_split: tuple = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def split(self) -> tuple[nnx.GraphDef, nnx.State]:
        """``nnx.split(self.model)``, traversed once per model (the traversal is milliseconds of Python per
        call, a large part of a small model's generate call). The state holds the model's own Variables,
        so values changed in place (``nnx.update``, ``variable[...] = x``, training) are seen; assigning a
        new ``model`` is seen too. Replacing a submodule or Variable inside the model is not: make a new
        ``Generator`` for that."""
        if self._split is None or self._split[0] is not self.model:
            self._split = (self.model, *nnx.split(self.model))
        return self._split[1:]

    def decode_split(self) -> tuple[nnx.GraphDef, nnx.State]:
        """The graph and state decoding runs on: ``split()``'s, except on CPU, where the decoder's layers
        are unstacked (``rag_jax.models.bart.unstacked_decoder``: read in place at every token, at the cost
        of a copy of their weights). Made once per set of weights: rebuilt when any parameter array is
        replaced (``nnx.update``, training), never stale."""
        graphdef, state = self.split()
        if jax.default_backend() != "cpu":
            return graphdef, state
        leaves = jax.tree.leaves(state)
        cached = self._decode_split
        if cached is None or len(cached[0]) != len(leaves) or any(r() is not a for r, a in zip(cached[0], leaves)):
            self._decode_split = cached = ([_ref(a) for a in leaves], *nnx.split(unstacked_decoder(self.model)))
        return cached[1:]

    def logits(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None) -> jax.Array:
        """Float32 ``[B, T, V]`` logits of a deterministic forward pass, jitted (compiled once per shape)."""
        if self._logits_jit is None:
            self._logits_jit = jax.jit(_logits)
        graphdef, state = self.split()
        return self._logits_jit(graphdef, state, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
