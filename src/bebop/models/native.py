"""Native MTP weights inside a model checkpoint directory, imported as a Bebop head.

The layouts and their key mapping are in ``native_layouts.py``, reading the shards through the index in
``native_shards.py``, the on-disk <-> in-memory block conversion in ``native_convert.py`` and writing a head as the
model's own MTP layer in ``native_write.py``; their public names are importable from here too. The values are read
by the family's own classes (zero-centred RMSNorm and gated attention in Qwen3.5 / Qwen3-Next, MLA in DeepSeek-V3),
so an imported head computes what the family's own MTP module computes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from bebop.errors import BebopError
from bebop.models.checkpoint import _few, build_head, check_sizes
from bebop.models.mtp import MTPHead, _text_config
from bebop.models.native_convert import convert, layers_prefix
from bebop.models.native_layouts import (
    DEEPSEEK_SHARED,
    PARTS,
    configs,
    detect,
    locate,
    native_layout,
    num_native_layers,
    swap_halves,
)
from bebop.models.native_shards import base_layers, load_tensors, native_keys, read_json
from bebop.models.native_write import copy_checkpoint_with_head, native_tensors, save_model_with_head

__all__ = [
    "copy_checkpoint_with_head",
    "has_native_mtp",
    "load_native_head",
    "model_dir_of",
    "native_keys",
    "native_layout",
    "native_tensors",
    "num_native_layers",
    "save_model_with_head",
]


def _split(tensors: dict[str, torch.Tensor], layout: str, n_base: int, source: Path):
    """Checkpoint tensors -> (Bebop-named parts, per-layer block tensors in checkpoint names, shared copies,
    keys of no known layout)."""
    parts = {f"{v}.weight": k for k, v in PARTS[layout].items()}
    own: dict[str, torch.Tensor] = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        where = locate(key, layout, n_base)
        if where is None:
            unknown.append(key)
            continue
        i, name = where
        if layout == "qwen3_5" and key.startswith("mtp.layers.") and i != 0:
            raise BebopError(
                f"{source} has several decoder layers sharing one fc/norm set in its Qwen3.5 MTP module (found "
                f"{key}); Bebop's head has its own fc and norms per layer, so only mtp.layers.0 is supported"
            )
        if name in parts and not (layout == "qwen3_5" and key.startswith("mtp.layers.")):
            t = swap_halves(t) if layout == "mimo" and parts[name] == "eh_proj" else t
            own[f"layers.{i}.{parts[name]}.weight"] = t
        elif layout == "deepseek_v3" and name in DEEPSEEK_SHARED:
            shared[f"{DEEPSEEK_SHARED[name]}@{n_base + i}"] = t
        else:
            blocks.setdefault(i, {})[name] = t
    return own, blocks, shared, unknown


def _import_blocks(model: PreTrainedModel, blocks: dict[int, dict[str, torch.Tensor]], n_base: int, source: Path):
    """Checkpoint-format block tensors -> Bebop names ``layers.{i}.mtp_block.*`` in the in-memory format."""
    prefix = layers_prefix(model)
    named = {f"{prefix}{n_base + i}.{name}": t for i, block in blocks.items() for name, t in block.items()}
    try:
        converted = convert(model, named, to_checkpoint=False)
    except Exception as e:  # a conversion op on tensors of the wrong shape or count
        raise BebopError(f"cannot convert the MTP block weights in {source} to {type(model).__name__}: {e}") from None
    own = {}
    for key, t in converted.items():
        n, rest = key.removeprefix(prefix).split(".", 1)
        own[f"layers.{int(n) - n_base}.mtp_block.{rest}"] = t
    return own


def _check_dir_fits(model_dir: Path, model: PreTrainedModel) -> None:
    vocab, hidden = model.get_input_embeddings().weight.shape
    for cfg in configs(read_json(model_dir / "config.json", "model config"))[::-1]:
        for field, have in (("hidden_size", hidden), ("vocab_size", vocab)):
            if isinstance(cfg.get(field), int) and cfg[field] != have:
                raise BebopError(
                    f"the MTP weights in {model_dir} belong to a model with {field} {cfg[field]}, "
                    f"but the model has {field} {have}"
                )
        if "hidden_size" in cfg:
            return


def model_dir_of(model: PreTrainedModel) -> Path | None:
    """The directory ``model`` was loaded from (transformers records it in ``config._name_or_path``), if any."""
    name = getattr(model.config, "_name_or_path", "") or ""
    return Path(name) if name and Path(name).is_dir() else None


def has_native_mtp(model: PreTrainedModel) -> bool:
    """Whether the checkpoint ``model`` was loaded from ships MTP weights (read from its index, no tensors)."""
    model_dir = model_dir_of(model)
    return model_dir is not None and bool(native_keys(model_dir))


def load_native_head(model_dir: str | Path, model: PreTrainedModel) -> MTPHead:
    """The checkpoint's own MTP layer(s) as a Bebop head bound to ``model`` (on its device and dtype).

    Only the MTP tensors are read, from only the shards that hold them. Raises one BebopError when the
    checkpoint has no MTP weights, when MTP-looking keys fit no known layout (naming the first ones), or when the
    weights do not fit ``model`` (hidden size, vocabulary, block parameters).
    """
    model_dir = Path(model_dir)
    keys = native_keys(model_dir)
    if not keys:
        kind = getattr(_text_config(model.config), "model_type", type(model).__name__)
        raise BebopError(
            f"{model_dir} has no native MTP weights (model type {kind!r}); train a fresh head warm-started "
            "from the model's own decoder layer instead of --init native"
        )
    n_base = base_layers(model_dir)
    layout = detect(list(keys), n_base)
    if layout is None:
        raise BebopError(f"MTP weights in {model_dir} are in no known layout; first keys: {_few(keys)}")
    _check_dir_fits(model_dir, model)
    own, blocks, shared, unknown = _split(load_tensors(model_dir, keys), layout, n_base, model_dir)
    if unknown:
        raise BebopError(f"MTP weights in {model_dir} outside the {layout} layout; first keys: {_few(unknown)}")
    check_sizes(own, shared, model, model_dir)
    own.update(_import_blocks(model, blocks, n_base, model_dir))
    return build_head(own, model, model_dir, layout)
