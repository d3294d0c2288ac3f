"""MTP block tensors between a checkpoint's on-disk format and transformers' in-memory one, through the base
model's own transformers weight conversions: MoE blocks are stored per expert on disk (``experts.{j}.gate_proj``,
``up_proj``, ``down_proj``) and fused in memory (``experts.gate_up_proj``, ``down_proj``), and some families rename
parameters on the way (``attention_sink_bias`` -> ``sinks``). These are the conversions ``from_pretrained`` and
``save_pretrained`` apply to the model's own layers, so an MTP block is read and written as they are."""

from __future__ import annotations

from copy import deepcopy

import torch
from transformers import PreTrainedModel

from bebop.errors import BebopError


def layers_prefix(model: PreTrainedModel) -> str:
    """The state-dict prefix of the model's decoder layers (``model.layers.`` for the causal LMs here)."""
    layers = model.get_decoder().layers
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise BebopError(f"cannot find the decoder layers of {type(model).__name__}")  # pragma: no cover


def convert(model: PreTrainedModel, tensors: dict[str, torch.Tensor], to_checkpoint: bool) -> dict[str, torch.Tensor]:
    """Tensors named in ``model``'s layer namespace through ``model``'s own transformers weight conversions: from
    the checkpoint format to the in-memory one, or back (as ``save_pretrained`` does). Prefix changes are left
    out: the caller chooses the names."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        PrefixChange,
        WeightConverter,
        WeightRenaming,
        apply_converters,
        apply_renamings,
        dot_natural_key,
    )

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = get_model_conversion_mapping(model, add_legacy=False)
    conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    if to_checkpoint:
        conversions = [c.reverse_transform() for c in conversions[::-1]]
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    groups: dict[str, WeightRenaming | WeightConverter] = {}
    for key, tensor in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
        name = key if to_checkpoint else apply_renamings(key, renamings)
        name, pattern = apply_converters(name, converters)
        if pattern is None:
            name = apply_renamings(key, renamings) if to_checkpoint else name
            group = groups.setdefault(name, WeightRenaming(key, name))
            pattern = key
        else:
            group = groups.setdefault(name, deepcopy(by_pattern[pattern]))
        group.add_tensor(name, key, pattern, tensor)
    out: dict[str, torch.Tensor] = {}
    for name, group in groups.items():
        for target, value in group.convert(name, model=model, config=model.config).items():
            if to_checkpoint and isinstance(group, WeightConverter):
                target = apply_renamings(target, renamings)
            out[target] = value[0] if isinstance(value, list) else value
    return out
