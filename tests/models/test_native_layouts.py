"""The native MTP layouts: which config (or parsed config.json, multimodal wrappers included) has which layout and
how many MTP layers, and how checkpoint keys map to (MTP layer, name inside it) in each layout."""

from __future__ import annotations

import torch
from native_helpers import SHAPE

from bebop.models.families import ARCHS, NATIVE_MTP_ARCHS, family_config
from bebop.models.native_layouts import (
    detect,
    is_appended_layer,
    locate,
    native_layout,
    num_native_layers,
    part_key,
    swap_halves,
)


def test_layout_and_count_of_configs():
    for arch in ARCHS:
        cfg = family_config(arch, 40, SHAPE)
        want = {"qwen3_5": "qwen3_5", "qwen3_next": "qwen3_5", "deepseek_v3": "deepseek_v3", "glm4_moe": "deepseek_v3"}
        assert native_layout(cfg) == want.get(arch)
        assert num_native_layers(cfg) == (1 if arch in NATIVE_MTP_ARCHS else 0)
    vl = {"model_type": "qwen3_5", "text_config": {"model_type": "qwen3_5_text", "mtp_num_hidden_layers": 1}}
    kimi = {"model_type": "kimi_k25", "text_config": {"model_type": "deepseek_v3", "num_nextn_predict_layers": 2}}
    mimo = {"model_type": "mimo", "num_nextn_predict_layers": 1}
    moe = {"model_type": "qwen3_5_moe_text", "mtp_num_hidden_layers": 1}
    assert [native_layout(c) for c in (vl, kimi, mimo, moe)] == ["qwen3_5", "deepseek_v3", "mimo", "qwen3_5"]
    assert [num_native_layers(c) for c in (vl, kimi, mimo, moe)] == [1, 2, 1, 1]
    assert native_layout({"model_type": "qwen2"}) is None and num_native_layers({"model_type": "llama"}) == 0


def test_keys_map_to_layer_and_name_in_each_layout():
    # Qwen3.5: parts at mtp.*, the block under mtp.layers.0 (the released multimodal checkpoints keep mtp.* at the
    # top level while the language model sits under model.language_model.)
    assert locate("mtp.fc.weight", "qwen3_5", 24) == (0, "fc.weight")
    assert locate("mtp.layers.0.self_attn.q_proj.weight", "qwen3_5", 24) == (0, "self_attn.q_proj.weight")
    assert locate("mtp.embed_tokens.weight", "qwen3_5", 24) is None
    assert part_key("qwen3_5", 0, 24, "norm.weight") == "mtp.norm.weight"
    assert part_key("qwen3_5", 0, 24, "mlp.up_proj.weight", block=True) == "mtp.layers.0.mlp.up_proj.weight"
    # DeepSeek: appended decoder layers, under any of the language-model prefixes
    assert locate("model.layers.61.eh_proj.weight", "deepseek_v3", 61) == (0, "eh_proj.weight")
    assert locate("model.language_model.layers.62.enorm.weight", "deepseek_v3", 61) == (1, "enorm.weight")
    assert locate("model.layers.60.eh_proj.weight", "deepseek_v3", 61) is None
    assert part_key("deepseek_v3", 1, 62, "hnorm.weight") == "model.layers.62.hnorm.weight"
    assert is_appended_layer("model.language_model.layers.2.mlp.gate.weight", 2)
    assert not is_appended_layer("model.visual.blocks.2.attn.qkv.weight", 2)
    # MiMo
    assert locate("model.mtp_layers.1.input_proj.weight", "mimo", 36) == (1, "input_proj.weight")
    assert part_key("mimo", 0, 36, "final_layernorm.weight") == "model.mtp_layers.0.final_layernorm.weight"


def test_detect_the_layout_of_mtp_keys():
    assert detect(["mtp.fc.weight", "mtp.layers.0.mlp.up_proj.weight"], 24) == "qwen3_5"
    assert detect(["model.mtp_layers.0.input_proj.weight"], 36) == "mimo"
    assert detect(["model.layers.61.enorm.weight"], 61) == "deepseek_v3"
    assert detect(["mtp.0.e_proj.weight", "mtp.0.enorm.weight"], 43) is None  # DeepSeek-V4's names: not read
    assert detect(["model.mtp.layers.0.eh_proj.weight"], 48) is None  # MiMo-V2-Flash's names: not read


def test_swap_halves_is_its_own_inverse():
    w = torch.arange(24.0).reshape(3, 8)
    assert torch.equal(swap_halves(w)[:, :4], w[:, 4:]) and torch.equal(swap_halves(swap_halves(w)), w)
