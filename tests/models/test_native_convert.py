"""MTP block tensors through the model's own transformers weight conversions: per-expert checkpoint tensors fuse
into the in-memory experts exactly as written out by hand, and the reverse gives back the checkpoint tensors."""

from __future__ import annotations

import native_helpers
import torch
from native_helpers import SHAPE

from bebop.models.families import build_family_policy
from bebop.models.native_convert import convert, layers_prefix

tok = native_helpers.tok  # the shared fixture


def test_experts_fuse_and_split_back(tok):
    torch.manual_seed(0)
    model = build_family_policy("qwen3_next", SHAPE, tok)
    prefix = layers_prefix(model)
    assert prefix == "model.layers."
    memory = {f"{prefix}1.{k}": v.clone() for k, v in model.model.layers[1].state_dict().items()}
    disk = convert(model, memory, to_checkpoint=True)
    n = model.config.num_experts
    assert f"{prefix}1.mlp.experts.{n - 1}.gate_proj.weight" in disk
    assert f"{prefix}1.mlp.experts.gate_up_proj" not in disk
    gate_up = torch.stack(
        [torch.cat([disk[f"{prefix}1.mlp.experts.{j}.{p}_proj.weight"] for p in ("gate", "up")]) for j in range(n)]
    )
    assert torch.equal(gate_up, memory[f"{prefix}1.mlp.experts.gate_up_proj"])
    back = convert(model, disk, to_checkpoint=False)
    assert back.keys() == memory.keys() and all(torch.equal(back[k], memory[k]) for k in memory)
