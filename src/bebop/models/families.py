"""The toy world in each model family: a tiny random config of Qwen3, Llama, Qwen3.5 (hybrid), Qwen3-Next (hybrid
MoE), DeepSeek-V3 (MLA + MoE) or GLM-4.5 (MoE) with the shape of :class:`bebop.models.policy.ModelConfig`.

The configs are built from the families' own transformers config classes, so every model runs through the
family's own modules (zero-centred RMSNorms and gated attention for Qwen3.5 / Qwen3-Next, Gated DeltaNet linear
attention, MLA, routed experts). Families that ship native MTP weights carry their real config key for one MTP
layer, spelled as the released checkpoints spell it:

* Qwen3.5 / Qwen3-Next: ``mtp_num_hidden_layers`` (Qwen3.5 ``text_config`` and vLLM's
  ``SpeculativeConfig.hf_config_override`` read it), with ``mtp_use_dedicated_embeddings: false``;
* DeepSeek-V3 / GLM-4.5: ``num_nextn_predict_layers`` (transformers' ``num_mtp_layers`` is an alias of it).

Hybrid layer patterns follow the released 3:1 ratio (three linear-attention layers, then one full-attention
layer) and always end with a full-attention layer, which is the layer an MTP block copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from bebop.errors import BebopError

if TYPE_CHECKING:  # policy.py builds its Qwen3 through this module: import it for types only
    from bebop.models.policy import ModelConfig

ARCHS: tuple[str, ...] = ("qwen3", "llama", "qwen3_5", "qwen3_next", "deepseek_v3", "glm4_moe")
NATIVE_MTP_ARCHS: tuple[str, ...] = ("qwen3_5", "qwen3_next", "deepseek_v3", "glm4_moe")

NUM_EXPERTS = 4
EXPERTS_PER_TOKEN = 2
SHARED_EXPERTS = 1


def hybrid_layer_types(num_layers: int) -> list[str]:
    """3 linear-attention layers per full-attention layer, ending with a full one (8 → 6 + 2, 2 → 1 + 1, 1 → 1 full)."""
    full = max(1, round(num_layers / 4))
    linear = num_layers - full
    types = []
    for i in range(full):
        chunk = linear // full + (1 if i < linear % full else 0)
        types += ["linear_attention"] * chunk + ["full_attention"]
    return types


def _common(vocab_size: int, shape: ModelConfig, ids: dict) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        **ids,
    )


def _moe_width(shape: ModelConfig) -> int:
    return max(8, shape.intermediate_size // NUM_EXPERTS)


def _linear_attention(shape: ModelConfig) -> dict:
    """Small Gated DeltaNet dims: value heads = 2 x key heads as in the released models."""
    head = max(8, shape.hidden_size // shape.num_heads)
    return dict(
        linear_conv_kernel_dim=4,
        linear_key_head_dim=head,
        linear_value_head_dim=head,
        linear_num_key_heads=max(1, shape.num_kv_heads),
        linear_num_value_heads=2 * max(1, shape.num_kv_heads),
        layer_types=hybrid_layer_types(shape.num_layers),
    )


def _qwen3(vocab_size, shape, ids):
    from transformers import Qwen3Config

    return Qwen3Config(**_common(vocab_size, shape, ids), head_dim=shape.hidden_size // shape.num_heads)


def _llama(vocab_size, shape, ids):
    from transformers import LlamaConfig

    return LlamaConfig(**_common(vocab_size, shape, ids), head_dim=shape.hidden_size // shape.num_heads)


def _qwen3_5(vocab_size, shape, ids):
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        **_common(vocab_size, shape, ids),
        head_dim=shape.hidden_size // shape.num_heads,
        **_linear_attention(shape),
        mtp_num_hidden_layers=1,
        mtp_use_dedicated_embeddings=False,
    )


def _qwen3_next(vocab_size, shape, ids):
    from transformers import Qwen3NextConfig

    width = _moe_width(shape)
    return Qwen3NextConfig(
        **_common(vocab_size, shape, ids),
        head_dim=shape.hidden_size // shape.num_heads,
        **_linear_attention(shape),
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=EXPERTS_PER_TOKEN,
        moe_intermediate_size=width,
        shared_expert_intermediate_size=width,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        mtp_num_hidden_layers=1,
        mtp_use_dedicated_embeddings=False,
    )


def _deepseek_v3(vocab_size, shape, ids):
    from transformers import DeepseekV3Config

    head = shape.hidden_size // shape.num_heads
    rope = max(2, head // 2 - (head // 2) % 2)
    common = _common(vocab_size, shape, ids)
    common["num_key_value_heads"] = shape.num_heads  # MLA: keys/values are per head (as DeepSeek-V3's 128/128)
    return DeepseekV3Config(
        **common,
        moe_intermediate_size=_moe_width(shape),
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=EXPERTS_PER_TOKEN,
        n_shared_experts=SHARED_EXPERTS,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=min(1, shape.num_layers - 1),
        kv_lora_rank=max(8, shape.hidden_size // 4),
        q_lora_rank=max(8, shape.hidden_size // 2),
        qk_rope_head_dim=rope,
        qk_nope_head_dim=max(2, head - rope),
        v_head_dim=head,
        num_nextn_predict_layers=1,
    )


def _glm4_moe(vocab_size, shape, ids):
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        **_common(vocab_size, shape, ids),
        head_dim=shape.hidden_size // shape.num_heads,
        moe_intermediate_size=_moe_width(shape),
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=EXPERTS_PER_TOKEN,
        n_shared_experts=SHARED_EXPERTS,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=min(1, shape.num_layers - 1),
        num_nextn_predict_layers=1,
    )


_BUILDERS = {
    "qwen3": _qwen3,
    "llama": _llama,
    "qwen3_5": _qwen3_5,
    "qwen3_next": _qwen3_next,
    "deepseek_v3": _deepseek_v3,
    "glm4_moe": _glm4_moe,
}


def check_arch(arch: str) -> str:
    """``arch`` if it is one of :data:`ARCHS`, else a BebopError naming it."""
    if arch not in _BUILDERS:
        raise BebopError(f"unknown model family {arch!r}; choose one of {', '.join(ARCHS)}")
    return arch


def family_config(
    arch: str,
    vocab_size: int,
    shape: ModelConfig,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PretrainedConfig:
    """A tiny config of family ``arch`` (one of :data:`ARCHS`) with ``shape``'s layers, widths, heads and positions.

    ``qwen3`` is exactly the toy policy's config. Native-MTP families carry their config key for one MTP layer.
    """
    check_arch(arch)
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise BebopError(f"vocab_size must be a positive int, got {vocab_size!r}")
    ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return _BUILDERS[arch](vocab_size, shape, ids)


def build_family_policy(arch: str, shape: ModelConfig, tokenizer) -> PreTrainedModel:
    """A freshly initialised tiny causal LM of family ``arch`` whose vocabulary and special ids match ``tokenizer``."""
    config = family_config(
        arch,
        len(tokenizer),
        shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM._model_mapping[type(config)](config)
