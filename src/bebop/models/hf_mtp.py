"""transformers' own ``generate(use_mtp=True)`` driven with a Bebop head, for side-by-side benchmarks."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel

from bebop.errors import BebopError
from bebop.models.checkpoint import export_head
from bebop.models.mtp import MTPHead, _text_config


def hf_mtp_generate(
    model: PreTrainedModel, head: MTPHead, input_ids: torch.Tensor, max_new_tokens: int, **gen_kwargs
) -> torch.Tensor:
    """Run transformers' own ``model.generate(..., use_mtp=True)`` with ``head`` as the MTP module.

    How transformers 5.24 does it (generation/utils.py ``_get_candidate_generator`` -> candidate_generator.py
    ``MTPCandidateGenerator`` -> modeling_layers.py ``MtpModel.from_pretrained``): it needs
    ``config.num_mtp_layers`` (and ``mtp_layer_types`` when the config has ``layer_types``, for
    ``get_mtp_config``), then re-reads the MTP weights from the checkpoint files of ``config.name_or_path``,
    selecting keys with regexes taken from ``model._keys_to_ignore_on_load_unexpected`` (Qwen3ForCausalLM has
    none) restricted to layer numbers >= num_hidden_layers, i.e. DeepSeek numbering, and renames them with
    ``layers.{N}.`` -> ``layers.{N - num_hidden_layers}.mtp_block.`` + ``mapping["MtpModel"]``. The MtpModel
    it builds has exactly Bebop's parameter names and computation (MtpLayer with the base decoder-layer class).

    So for a stock Qwen3ForCausalLM we: export the head in the DeepSeek-V3 layout to a temporary
    ``model.safetensors``, and for the duration of the call point ``config.name_or_path`` there, set
    ``num_mtp_layers``/``mtp_layer_types`` and the key regex — transformers' own loader then loads our weights.
    Everything is restored afterwards. Limitation (transformers): assisted decoding supports batch size 1 only.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise BebopError(
            f"transformers' generate(use_mtp=True) (assisted decoding) supports batch size 1 only; "
            f"got input_ids of shape {tuple(input_ids.shape)}"
        )
    cfg = model.config
    text_cfg = _text_config(cfg)
    n0 = int(text_cfg.num_hidden_layers)
    sentinel = object()
    saved = {
        "num_mtp_layers": getattr(text_cfg, "num_mtp_layers", sentinel),
        "mtp_layer_types": getattr(text_cfg, "mtp_layer_types", sentinel),
    }
    saved_name = cfg._name_or_path
    saved_dtype = getattr(cfg, "dtype", None)
    had_own_keys = "_keys_to_ignore_on_load_unexpected" in model.__dict__
    old_keys = model.__dict__.get("_keys_to_ignore_on_load_unexpected")
    with tempfile.TemporaryDirectory(prefix="bebop-hf-mtp-") as tmp:
        export_head(head, Path(tmp) / "model.safetensors", "deepseek_v3", num_base_layers=n0, include_shared=False)
        try:
            text_cfg.num_mtp_layers = head.num_layers
            if getattr(text_cfg, "layer_types", None) is not None:
                text_cfg.mtp_layer_types = ["full_attention"] * head.num_layers
            cfg._name_or_path = tmp
            if saved_dtype is None:  # models built from a config (not from_pretrained) have config.dtype None
                cfg.dtype = model.dtype
            model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n0 + i}\..*" for i in range(head.num_layers)]
            return model.generate(input_ids, max_new_tokens=max_new_tokens, use_mtp=True, **gen_kwargs)
        finally:
            cfg._name_or_path = saved_name
            cfg.dtype = saved_dtype
            if had_own_keys:
                model._keys_to_ignore_on_load_unexpected = old_keys
            else:
                model.__dict__.pop("_keys_to_ignore_on_load_unexpected", None)
            for k, v in saved.items():
                if v is sentinel:
                    if k in text_cfg.__dict__:
                        delattr(text_cfg, k)
                else:
                    setattr(text_cfg, k, v)
