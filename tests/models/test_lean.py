"""bebop.models.lean computes what transformers computes: logits of the lean target and head forwards match the HF
modules on random prompts with left padding and holes, in one call and chunked through the static cache;
fused weights follow in-place updates; the engine's transformers fallback gives the same log-probs."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_policy

from bebop.core.sampling import SamplingParams
from bebop.engine import decode as engine
from bebop.models.lean import lean_decoder, lean_head
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
