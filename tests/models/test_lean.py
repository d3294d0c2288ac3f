"""bebop.models.lean computes what transformers computes: hidden states and logits of the lean target and head
forwards match the HF modules on random prompts with left padding and holes, in one call and chunked through the
static cache, for Qwen3, Llama (default and llama3 RoPE, biases, explicit head_dim) and Qwen2; the lean RoPE tables
are the rotary module's own; options the lean path cannot reproduce are refused with a reason; fused weights follow
in-place updates; the engine's transformers fallback gives the same log-probs."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_policy
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from bebop.core.sampling import SamplingParams
from bebop.engine import decode as engine
from bebop.models.lean import lean_decoder, lean_head, why_not_lean, why_not_lean_head
from bebop.models.mtp import MTPHead


@pytest.fixture(scope="module")
def policy(tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=3)
    with torch.no_grad():  # non-trivial norm weights, so folding them into the fused matmuls is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    head = MTPHead.from_base(model).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, head


def random_batch(vocab: int, seed: int):
    """[B, T] ids with left padding (rows 1, 2) and holes in the middle (rows 0, 2); positions skip holes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 14), generator=g)
    mask = torch.ones(3, 14, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :2] = 0
    mask[0, 6] = 0
    mask[2, 9:11] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@torch.inference_mode()
@pytest.mark.parametrize("seed", [0, 1])
def test_lean_target_logits_match_transformers(policy, seed):
    model, _ = policy
    ids, mask, pos = random_batch(model.config.vocab_size, seed)
    ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    lean = lean_decoder(model)
    assert lean is not None
    real = mask.bool()
    one = lean.logits(lean(ids, pos, real, lean.new_cache(3, 8), 0))   # capacity 8 < 14: the cache grows
    torch.testing.assert_close(one[real], ref[real], atol=1e-4, rtol=1e-4)
    # chunked through the cache: 6 slots, then 1, then 4, then 3
    cache = lean.new_cache(3, 32)
    chunks = []
    for a, b in ((0, 6), (6, 7), (7, 11), (11, 14)):
        chunks.append(lean(ids[:, a:b], pos[:, a:b], real[:, :b], cache, a))
    chunked = lean.logits(torch.cat(chunks, 1))
    torch.testing.assert_close(chunked[real], ref[real], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_lean_head_matches_transformers_mtp_layer(policy):
    model, head = policy
    ids, mask, pos = random_batch(model.config.vocab_size, 5)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    ref = head(ids, hidden, pos, mask, head.new_cache())
    lean = lean_head(head, model)
    assert lean is not None
    real = mask.bool()
    cache = lean.new_cache(3, 4)
    out = torch.cat([lean(ids[:, a:b], hidden[:, a:b], pos[:, a:b], real[:, :b], cache, a)
                     for a, b in ((0, 9), (9, 10), (10, 14))], 1)
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lean.base.logits(out)[real], head.logits(ref)[real], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_lean_head_runs_each_layer_of_a_multi_layer_head(policy):
    """Layer j of the lean head is layer j of ``MTPHead.forward`` (each with its own cache layer)."""
    model, _ = policy
    torch.manual_seed(7)
    head = MTPHead.from_base(model, num_layers=2).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, mask, pos = random_batch(model.config.vocab_size, 6)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    lean = lean_head(head, model)
    assert lean is not None
    real = mask.bool()
    cache = lean.new_cache(3, 16)
    outs = [lean(ids, hidden, pos, real, cache, 0, layer) for layer in (0, 1)]
    refs = [head(ids, hidden, pos, mask, head.new_cache(), layer=layer) for layer in (0, 1)]
    for out, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(outs[0][real], outs[1][real], atol=1e-3)        # the layers differ


def test_lean_forward_follows_in_place_weight_updates(tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=4)
    ids, mask, pos = random_batch(model.config.vocab_size, 2)
    with torch.inference_mode():
        first = lean_decoder(model)
        assert lean_decoder(model) is first                   # cached while the weights are unchanged
    with torch.no_grad():
        model.get_decoder().layers[0].mlp.up_proj.weight.mul_(1.5)   # what an optimizer step does
    with torch.inference_mode():
        second = lean_decoder(model)
        assert second is not first
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = second.logits(second(ids, pos, mask.bool(), second.new_cache(3, 16), 0))
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "transformers"])
def test_engine_paths_agree_with_a_full_forward(policy, tiny_tokenizer, backend):
    """Both engine backends (lean, transformers) return the log-probs of a fresh full forward."""
    model, head = policy
    prompts = [tiny_tokenizer("Q: 1+2\n")["input_ids"], tiny_tokenizer("Q: 12*3-4\n")["input_ids"]] * 2
    params = SamplingParams(temperature=1.0)
    for r in (engine.generate(model, prompts, params, 12, None, generator=torch.Generator().manual_seed(0),
                              backend=backend),
              engine.generate_mtp(model, head, prompts, params, 12, None, gamma=3,
                                  generator=torch.Generator().manual_seed(0), backend=backend)):
        for b, comp in enumerate(r.completions()):
            ids = torch.tensor([prompts[b] + comp])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompts[b]) - 1 : -1]
            ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)
            torch.testing.assert_close(r.logprobs[b], ref, atol=2e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- Llama and Qwen2

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}   # small, so all 3 regimes occur


def family_config(kind: str, vocab: int, **options):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=512, **options)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "llama3":   # llama3 RoPE scaling, every bias the config offers, head_dim != hidden / heads
        return LlamaConfig(**common, rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True, head_dim=24)
    return Qwen2Config(**common)   # q/k/v biases


def build_family(kind: str, vocab: int, seed: int = 5, **options):
    """A tiny random model of ``kind`` with non-trivial norm weights and biases (zero at init) and its MTP head,
    perturbed so that every folded or fused weight matters."""
    torch.manual_seed(seed)
    cfg = family_config(kind, vocab, **options)
    model = (Qwen2ForCausalLM if kind == "qwen2" else LlamaForCausalLM)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    head = MTPHead.from_base(model).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, head


@pytest.fixture(scope="module", params=["llama", "llama3", "qwen2"])
def family(request, tiny_tokenizer):
    return build_family(request.param, len(tiny_tokenizer))


def test_llama3_rope_tables_are_the_rotary_modules_own(tiny_tokenizer):
    """The lean cos/sin tables equal LlamaRotaryEmbedding's output under llama3 scaling, at positions past the
    original context, and the tiny config really scales (high frequencies kept, low ones divided by 8, a smoothed
    band between)."""
    model, _ = build_family("llama3", len(tiny_tokenizer))
    rotary = model.get_decoder().rotary_emb
    d = model.config.head_dim
    default = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    ratio = rotary.inv_freq / default
    assert ratio[0] == 1 and ratio[-1] == pytest.approx(1 / 8) and ((ratio < 1) & (ratio > 1 / 8)).any()
    lean = lean_decoder(model)
    assert lean is not None
    pos = torch.arange(300)[None]
    lean.rope.ensure(300)
    cos, sin_signed = lean.rope(pos)
    ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    half = d // 2
    sin = torch.cat([-sin_signed[..., :half], sin_signed[..., half:]], dim=-1)
    torch.testing.assert_close(cos[:, :, 0], ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin[:, :, 0], ref_sin, rtol=0, atol=0)


@torch.inference_mode()
@pytest.mark.parametrize("seed", [0, 1])
def test_family_lean_target_matches_transformers(family, seed):
    """Hidden states (after the final norm) and logits, in one call and in chunks through the cache with holes."""
    model, _ = family
    assert why_not_lean(model) == ""
    ids, mask, pos = random_batch(model.config.vocab_size, seed)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    ref_h, ref = out.hidden_states[-1], out.logits
    lean = lean_decoder(model)
    real = mask.bool()
    one = lean(ids, pos, real, lean.new_cache(3, 8), 0)
    cache = lean.new_cache(3, 32)
    chunked = torch.cat([lean(ids[:, a:b], pos[:, a:b], real[:, :b], cache, a)
                         for a, b in ((0, 6), (6, 7), (7, 11), (11, 14))], 1)
    for h in (one, chunked):
        torch.testing.assert_close(h[real], ref_h[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lean.logits(h)[real], ref[real], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_family_lean_head_matches_transformers_mtp_layer(family):
    model, head = family
    assert why_not_lean_head(head, model) == ""
    ids, mask, pos = random_batch(model.config.vocab_size, 5)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    ref = head(ids, hidden, pos, mask, head.new_cache())
    lean = lean_head(head, model)
    assert lean is not None
    real = mask.bool()
    cache = lean.new_cache(3, 4)
    out = torch.cat([lean(ids[:, a:b], hidden[:, a:b], pos[:, a:b], real[:, :b], cache, a)
                     for a, b in ((0, 9), (9, 10), (10, 14))], 1)
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lean.base.logits(out)[real], head.logits(ref)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "options", "reason"), [
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
     "layer 1 uses sliding-window attention (window 4)"),
    ("llama", dict(hidden_act="gelu"), "layer 0 has hidden_act 'gelu'"),
    ("llama", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
     "rope_type 'dynamic' changes its frequencies"),
])
def test_what_the_lean_path_cannot_reproduce_is_refused_with_its_reason(tiny_tokenizer, kind, options, reason):
    model, head = build_family(kind, len(tiny_tokenizer), **options)
    assert lean_decoder(model) is None and lean_head(head, model) is None
    assert reason in why_not_lean(model)
    assert reason in why_not_lean_head(head, model)


def test_a_head_with_zero_centred_norms_is_refused_on_a_lean_target(tiny_tokenizer):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model, _ = build_family("llama", len(tiny_tokenizer))
    head = MTPHead(model.config, decoder_layer_cls=LlamaDecoderLayer, norm_cls=GemmaRMSNorm)
    head.bind(model)
    assert lean_decoder(model) is not None and lean_head(head, model) is None
    assert "GemmaRMSNorm" in why_not_lean_head(head, model)
