"""A checkpoint's safetensors shards seen through ``model.safetensors.index.json``: which shard holds which
tensor, which tensors are MTP weights, and reading only those from only the shards that hold them, so the native
head is found without loading the checkpoint a second time."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bebop.errors import BebopError
from bebop.models.native_layouts import MTP_LOOKING, configs, is_appended_layer

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_json(path: Path, what: str) -> dict:
    """``path`` parsed, or one BebopError naming ``what`` and the file."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BebopError(f"cannot read {what} {path}: {e}") from None


def weight_map(model_dir: Path) -> dict[str, str]:
    """Every tensor name -> shard file, from the index or from the single file's header (no tensor is read)."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        found = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(found, dict):
            raise BebopError(f"safetensors index {index} has no weight_map")
        return dict(found)
    single = model_dir / SINGLE_NAME
    if not single.is_file():
        raise BebopError(f"no {INDEX_NAME} or {SINGLE_NAME} in model directory {model_dir}")
    from safetensors import safe_open

    try:
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return {k: SINGLE_NAME for k in f.keys()}
    except Exception as e:  # safetensors raises its own (Rust) error types for bad headers
        raise BebopError(f"cannot read {single}: corrupt or truncated safetensors ({e})") from None


def base_layers(model_dir: Path) -> int:
    """``num_hidden_layers`` of the checkpoint's language model (in ``text_config`` for multimodal wrappers)."""
    config = model_dir / "config.json"
    if not config.is_file():
        raise BebopError(f"model directory {model_dir} has no config.json")
    for cfg in configs(read_json(config, "model config")):
        if isinstance(cfg.get("num_hidden_layers"), int):
            return cfg["num_hidden_layers"]
    raise BebopError(f"{config} has no num_hidden_layers")


def native_keys(model_dir: str | Path) -> dict[str, str]:
    """The checkpoint's MTP tensor names -> shard file, read from ``model.safetensors.index.json`` (or the single
    ``model.safetensors`` header) without loading any tensor: ``mtp.*``, ``model.mtp_layers.*``, decoder layers
    numbered from ``num_hidden_layers`` on, and any other name that looks like MTP (``mtp``/``nextn``)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BebopError(f"model directory not found: {model_dir}")
    n_base = base_layers(model_dir)
    return {k: f for k, f in weight_map(model_dir).items() if is_appended_layer(k, n_base) or MTP_LOOKING.search(k)}


def load_tensors(model_dir: Path, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """Read only ``keys`` (name -> shard) from only the shards that hold them."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(keys.values())):
        path = model_dir / shard
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in (k for k, s in keys.items() if s == shard):
                    out[k] = f.get_tensor(k)
        except Exception as e:  # safetensors raises its own (Rust) error types for bad or missing files
            raise BebopError(f"cannot read MTP tensors from shard {path}: {e}") from None
    return out
