"""The toy world in each family: tiny random configs build and run through the family's own modules, carry the
family's real MTP config key, and give MTP heads a correct fresh init and warm start (zero-centred norms)."""

from __future__ import annotations

import pytest
import torch

from bebop.errors import BebopError
from bebop.models.families import (
    ARCHS,
    NATIVE_MTP_ARCHS,
    build_family_policy,
    family_config,
    hybrid_layer_types,
)
from bebop.models.mtp import MTPHead
from bebop.models.policy import ModelConfig, build_policy
from bebop.models.tokenizer import build_tokenizer

SHAPE = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
CLASSES = {
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3_5": "Qwen3_5ForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["the cat sat on the mat , 1 + 2 = 3 ."])


def test_arch_lists():
    assert ARCHS == ("qwen3", "llama", "qwen3_5", "qwen3_next", "deepseek_v3", "glm4_moe")
    assert set(NATIVE_MTP_ARCHS) == {"qwen3_5", "qwen3_next", "deepseek_v3", "glm4_moe"}


@pytest.mark.parametrize("arch", ARCHS)
def test_family_builds_and_runs(arch, tok):
    torch.manual_seed(0)
    model = build_family_policy(arch, SHAPE, tok).eval()
    cfg = model.config
    assert type(model).__name__ == CLASSES[arch]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (len(tok), 32, 2)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = torch.randint(0, len(tok), (2, 6))
    logits = model(ids).logits
    assert logits.shape == (2, 6, len(tok)) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "arch, key",
    [
        ("qwen3", None),
        ("llama", None),
        ("qwen3_5", "mtp_num_hidden_layers"),
        ("qwen3_next", "mtp_num_hidden_layers"),
        ("deepseek_v3", "num_nextn_predict_layers"),
        ("glm4_moe", "num_nextn_predict_layers"),
    ],
)
def test_native_mtp_config_key(arch, key):
    saved = family_config(arch, 40, SHAPE).to_dict()
    mtp_keys = {k for k in saved if "mtp" in k or "nextn" in k}
    if key is None:
        assert mtp_keys == set()
    else:
        assert saved[key] == 1
    if arch in ("qwen3_5", "qwen3_next"):
        assert saved["mtp_use_dedicated_embeddings"] is False


def test_hybrid_patterns_end_with_full_attention():
    assert hybrid_layer_types(8).count("linear_attention") == 6
    assert hybrid_layer_types(8)[3] == hybrid_layer_types(8)[7] == "full_attention"
    assert hybrid_layer_types(2) == ["linear_attention", "full_attention"]
    assert hybrid_layer_types(1) == ["full_attention"]
    for arch in ("qwen3_5", "qwen3_next"):
        cfg = family_config(arch, 40, ModelConfig(num_layers=8, hidden_size=32, num_heads=2, num_kv_heads=1))
        assert cfg.layer_types == hybrid_layer_types(8)
        assert cfg.linear_num_value_heads == 2 * cfg.linear_num_key_heads


def test_moe_and_mla_shapes():
    for arch in ("deepseek_v3", "glm4_moe"):
        cfg = family_config(arch, 40, SHAPE)
        assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts) == (4, 2, 1)
        assert cfg.first_k_dense_replace == 1
    nxt = family_config("qwen3_next", 40, SHAPE)
    assert (nxt.num_experts, nxt.num_experts_per_tok) == (4, 2)
    ds = family_config("deepseek_v3", 40, SHAPE)
    assert ds.num_key_value_heads == ds.num_attention_heads  # MLA keys/values are per head
    assert ds.qk_nope_head_dim + ds.qk_rope_head_dim == 32 // 2


def test_qwen3_family_is_the_toy_policy(tok):
    torch.manual_seed(3)
    a = build_policy(SHAPE, tok)
    torch.manual_seed(3)
    b = build_family_policy("qwen3", SHAPE, tok)
    assert type(a) is type(b) and a.config.to_dict() == b.config.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unknown_arch_is_named(tok):
    with pytest.raises(BebopError, match=r"'gpt2'.*qwen3, llama, qwen3_5, qwen3_next, deepseek_v3, glm4_moe"):
        build_family_policy("gpt2", SHAPE, tok)
    with pytest.raises(BebopError, match="vocab_size"):
        family_config("llama", 0, SHAPE)


# ----------------------------------------------------------------------------------- MTP heads on the families
def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("arch, zero_centred", [("qwen3", False), ("qwen3_5", True), ("qwen3_next", True)])
def test_fresh_head_norms_are_unit_scale(arch, zero_centred, tok):
    """A fresh head's norms are the identity scale in their class's convention (zero-centred: weight 0)."""
    model = build_family_policy(arch, SHAPE, tok)
    head = MTPHead(model.config, decoder_layer_cls=type(model.model.layers[-1]), norm_cls=type(model.model.norm))
    enorm = head.layers[0].enorm
    assert torch.all(enorm.weight == (0.0 if zero_centred else 1.0))
    x = torch.randn(3, 32)
    assert torch.allclose(enorm(x), _rms(x, enorm.eps if hasattr(enorm, "eps") else enorm.variance_epsilon))


@pytest.mark.parametrize("arch", ["qwen3_next", "deepseek_v3", "glm4_moe"])
def test_fresh_moe_head_experts_are_initialised(arch, tok):
    model = build_family_policy(arch, SHAPE, tok)
    torch.manual_seed(0)
    head = MTPHead(model.config, decoder_layer_cls=type(model.model.layers[-1]), norm_cls=type(model.model.norm))
    experts = head.layers[0].mtp_block.mlp.experts
    for t in (experts.gate_up_proj, experts.down_proj):
        assert torch.isfinite(t).all() and 0.01 < t.std().item() < 0.03


def test_warm_start_copies_the_last_layer_of_the_blocks_kind(tok):
    """Hybrid whose last layer is linear attention: the block is seeded from the last full-attention layer."""
    from transformers import Qwen3_5ForCausalLM

    cfg = family_config("qwen3_5", len(tok), SHAPE)
    cfg.layer_types = ["full_attention", "linear_attention"]
    model = Qwen3_5ForCausalLM(cfg)
    head = MTPHead.from_base(model)
    block, source = head.layers[0].mtp_block.state_dict(), model.model.layers[0].state_dict()
    assert all(torch.equal(block[k], source[k]) for k in block)
    assert torch.equal(head.layers[0].post_norm.weight, model.model.norm.weight)
    assert torch.all(head.layers[0].hnorm.weight == 0)  # zero-centred: scale 1, as the identity half of eh_proj needs
    ids = torch.randint(0, len(tok), (1, 5))
    h = head(ids, model.model(ids).last_hidden_state, torch.arange(5)[None])
    assert torch.isfinite(head.logits(h)).all()


def test_warm_start_from_moe_model_uses_an_moe_layer(tok):
    model = build_family_policy("deepseek_v3", SHAPE, tok)  # layer 0 dense, layer 1 MoE; MTP blocks are MoE
    head = MTPHead.from_base(model)
    block, source = head.layers[0].mtp_block.state_dict(), model.model.layers[1].state_dict()
    assert block.keys() == source.keys() and all(torch.equal(block[k], source[k]) for k in block)
