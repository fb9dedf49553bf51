"""Reading and writing transformers checkpoint folders, with strict key checks.

Weights are read with ``safetensors.numpy`` (no torch needed). A ``pytorch_model.bin`` is read only
when torch is installed, and only with ``torch.load(weights_only=True)``: we never unpickle
arbitrary objects. Every loader compares the keys it expects with the keys it finds and refuses
missing, unexpected or duplicate keys with a message that names them.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
CONFIG = "config.json"


class CheckpointKeyError(ValueError):
    """A checkpoint's keys do not match the keys the model expects."""


def _describe(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return shown + more


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def model_folder(path: str | os.PathLike) -> str:
    """``path`` if it is a local folder; a hub id (``org/name``) is downloaded with huggingface_hub
    where the network allows, and otherwise fails with a message saying to pass a local folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if not os.path.exists(path) and _HUB_ID.fullmatch(path):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(path)
        except Exception as e:  # no network, unknown repo, hub disabled...
            raise FileNotFoundError(
                f"{path!r} is not a local folder and could not be downloaded from the Hugging Face hub "
                f"({type(e).__name__}: {e}); pass the path of a local model folder"
            ) from e
    raise FileNotFoundError(f"{path!r} is not a local model folder")


def read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} is not a transformers model folder: no {CONFIG}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path} is a PyTorch pickle and torch is not installed; convert it to safetensors "
            "(or install torch, which rag_jax then uses with weights_only=True)"
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy() for k, v in state.items()}


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
    """All tensors of a transformers model folder, by key, as NumPy arrays.

    Reads ``model.safetensors``, a sharded ``model.safetensors.index.json`` (a key found in two
    shards is refused), or ``pytorch_model.bin`` (only with torch installed, weights_only).
    """
    single = os.path.join(folder, SAFETENSORS)
    index = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, np.ndarray] = {}
        for shard in shards:
            for key, value in load_file(os.path.join(folder, shard)).items():
                if key in state:
                    raise CheckpointKeyError(f"{folder}: duplicate key {key!r} (found again in shard {shard})")
                state[key] = value
        return state
    torch_bin = os.path.join(folder, TORCH_BIN)
    if os.path.isfile(torch_bin):
        return _read_torch_bin(torch_bin)
    raise FileNotFoundError(f"{folder!r} holds no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}")


def check_keys(expected: Iterable[str], found: Iterable[str], where: str) -> None:
    """Raise ``CheckpointKeyError`` naming every missing and unexpected key."""
    expected, found = set(expected), set(found)
    missing, unexpected = expected - found, found - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        raise CheckpointKeyError(f"{where}: " + "; ".join(parts))


def resolve_aliases(state: Mapping[str, np.ndarray], aliases: Mapping[str, str], where: str) -> dict[str, np.ndarray]:
    """Fold tied-weight aliases (alias -> canonical key) into their canonical key.

    transformers may save a tied weight under any of its names. An alias present next to its
    canonical key must hold the same values; otherwise it is a conflicting duplicate and refused.
    """
    state = dict(state)
    for alias, canonical in aliases.items():
        if alias not in state:
            continue
        value = state.pop(alias)
        if canonical in state:
            if state[canonical].shape != value.shape or not np.array_equal(state[canonical], value):
                raise CheckpointKeyError(f"{where}: duplicate key {alias!r} differs from tied weight {canonical!r}")
        else:
            state[canonical] = value
    return state


def write_state_dict(state: Mapping[str, np.ndarray], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state.items()}
    save_file(arrays, os.path.join(folder, SAFETENSORS), metadata={"format": "pt"})


def write_config(config: Mapping, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG), "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
        f.write("\n")
