"""bebop.models.hybrid computes what transformers computes on hybrid linear-attention decoders (Qwen3.5, Qwen3-Next)
and rolls each row's linear-attention state back to its own accepted position: the token-by-token delta rule is
transformers' recurrent kernel (value heads > key heads), its per-token states are what ``select_state``
re-derives; the decoder's hidden states and logits match the transformers model's full forward with left padding,
in one call and chunked through the cache (a prefill over more than ``STEPWISE_MAX`` tokens takes the chunked
rule); after forwards over junk tokens and ``keep`` with ragged per-row cuts (−1 and T−1 included), in both
state modes, the next tokens' logits are a fresh full forward's over the prompt and the kept junk only; misuse is
a BebopError."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

from bebop.errors import BebopError
from bebop.models.families import build_family_policy
from bebop.models.hybrid import MODES, STEPWISE_MAX, delta_rule, hybrid_decoder, select_state
from bebop.models.policy import ModelConfig

HYBRIDS = ["qwen3_5", "qwen3_next"]
SHAPE = ModelConfig(num_layers=4, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)


def build_hybrid(arch: str, tokenizer, seed: int = 0):
    """A tiny random ``arch`` model (3 Gated DeltaNet + 1 attention layer; 1 key head, 2 value heads per linear
    layer) with every vector parameter perturbed (norm weights, dt_bias, …), so none of them is a no-op, and a
    linear state that matters: q/k/v and output projections × 4, and slow decays (A = e^A_log in [0.02, 0.3]
    rather than up to 16, which forgets a token within one step) — so a state rolled back wrongly shows."""
    torch.manual_seed(seed)
    model = build_family_policy(arch, SHAPE, tokenizer).eval()
    assert model.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif "conv1d" in name:
                p.mul_(3.0)
            elif ".linear_attn." in name and ("in_proj_qkv" in name or "out_proj" in name):
                p.mul_(4.0)
        for layer in model.get_decoder().layers:
            if getattr(layer, "linear_attn", None) is not None:
                layer.linear_attn.A_log.copy_(torch.empty_like(layer.linear_attn.A_log).uniform_(0.02, 0.3).log())
    return model


@pytest.fixture(scope="module", params=HYBRIDS)
def hybrid(request, tiny_tokenizer):
    return build_hybrid(request.param, tiny_tokenizer)


def _l2norm(x):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def random_rule_inputs(B: int, T: int, hk: int, hv: int, dk: int, dv: int, seed: int):
    """(q, k [B, T, hk, dk], v [B, T, hv, dv], g, β [B, T, hv], initial state [B, hv, dk, dv]) as transformers takes
    them, with decays g < 0 and β in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, hk, dk, generator=g) for _ in range(2))
    v = torch.randn(B, T, hv, dv, generator=g)
    decay = -torch.rand(B, T, hv, generator=g) * 0.7
    beta = torch.rand(B, T, hv, generator=g)
    state = torch.randn(B, hv, dk, dv, generator=g)
    return q, k, v, decay, beta, state


def as_bebop(q, k, v, g, beta, hv):
    """The same inputs as ``delta_rule`` takes them (heads first, q / k repeated over their value heads,
    L2-normalised, q scaled by d_k^−½), as ``HybridDecoder`` prepares them."""
    rep = hv // q.shape[2]
    q, k = (t.repeat_interleave(rep, dim=2) for t in (q, k))
    q, k, v, g, beta = (t.transpose(1, 2).float() for t in (q, k, v, g, beta))
    return _l2norm(q) / q.shape[-1] ** 0.5, _l2norm(k), v, g, beta


def test_delta_rule_is_transformers_recurrent_rule_with_more_value_than_key_heads():
    B, T, hk, hv, dk, dv = 3, 7, 2, 4, 8, 6
    q, k, v, g, beta, state = random_rule_inputs(B, T, hk, hv, dk, dv, seed=0)
    ref_o, ref_s = torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state.clone(),
                                                    output_final_state=True, use_qk_l2norm_in_kernel=True)
    args = as_bebop(q, k, v, g, beta, hv)
    o, states = delta_rule(*args, state)
    assert o.shape == (B, hv, T, dv) and states.shape == (T + 1, B, hv, dk, dv)
    torch.testing.assert_close(o.transpose(1, 2), ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[0], state, atol=0, rtol=0)
    torch.testing.assert_close(states[-1], ref_s, atol=1e-5, rtol=1e-5)
    for t in range(T):                              # the state after token t = transformers' over the first t+1
        _, ref_t = torch_recurrent_gated_delta_rule(q[:, : t + 1], k[:, : t + 1], v[:, : t + 1], g[:, : t + 1],
                                                    beta[:, : t + 1], initial_state=state.clone(),
                                                    output_final_state=True, use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(states[t + 1], ref_t, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(states[1], states[-1], atol=1e-2)     # every token moves the state
    o2, final = delta_rule(*args, state, keep_states=False)
    assert torch.equal(o2, o) and torch.equal(final, states[-1])


def test_select_state_gathers_each_rows_own_state_of_the_delta_rule():
    B, T, hv = 4, 5, 4
    q, k, v, g, beta, state = random_rule_inputs(B, T, 2, hv, 8, 6, seed=1)
    args = as_bebop(q, k, v, g, beta, hv)
    _, states = delta_rule(*args, state)
    for last in ([-1, 0, 2, T - 1], [T - 1, -1, -1, 3], [-1] * B):
        last = torch.tensor(last)
        chosen = select_state(*args, state, last)
        torch.testing.assert_close(chosen, states[last + 1, torch.arange(B)], atol=0, rtol=0)
    assert torch.equal(select_state(*args, state, torch.full((B,), -1)), state)


def left_padded(vocab: int, T: int, seed: int):
    """[3, T] random ids, rows 1 and 2 left-padded by 5 and 2; positions count real tokens only."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :2] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
@pytest.mark.parametrize(("T", "cuts"), [(14, (0, 6, 7, 11, 14)), (STEPWISE_MAX + 16, (0, STEPWISE_MAX + 8, 73, 80))])
def test_hybrid_decoder_matches_transformers_full_forward(hybrid, T, cuts):
    """Hidden states (after the final norm) and logits at every real position, one call and chunked through the
    cache (a 1-token chunk included), with left padding; T = 80: the first call (72 tokens) is a prefill over more
    than STEPWISE_MAX tokens, i.e. transformers' chunked rule, and later calls go on from its final state."""
    model = hybrid
    ids, mask, pos = left_padded(model.config.vocab_size, T, seed=T)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    ref_h, ref = out.hidden_states[-1], out.logits
    dec = hybrid_decoder(model)
    assert dec is not None and hybrid_decoder(model) is dec
    assert dec.family.endswith("hybrid: 3 Gated DeltaNet + 1 attention layers")
    real = mask.bool()
    one = dec(ids, pos, real, dec.new_cache(3, 8), 0)          # capacity 8 < T: the KV slots grow
    results = [one]
    for mode in MODES:
        cache = dec.new_cache(3, 8, mode)
        results.append(torch.cat([dec(ids[:, a:b], pos[:, a:b], real[:, :b], cache, a)
                                  for a, b in zip(cuts, cuts[1:], strict=False)], 1))
    for h in results:
        torch.testing.assert_close(h[real], ref_h[real], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(dec.logits(h)[real], ref[real], atol=2e-5, rtol=1e-5)


def _full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@torch.inference_mode()
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [1, 4])
def test_keep_rolls_each_row_back_to_its_own_last_kept_token(hybrid, mode, T):
    """Prompt (left padding) → forward over T junk tokens → keep(last1) → forward over T more → keep(last2) → two
    next tokens: each row's next-token logits equal a fresh full forward over its prompt, the junk it kept and the
    next tokens. The rejected junk slots are holes for the attention layer (as the engine makes them); the
    linear layers must forget the rejected junk by themselves. T = 1 is the one-token path (no state stack)."""
    model = hybrid
    V = model.config.vocab_size
    dec = hybrid_decoder(model)
    g = torch.Generator().manual_seed(T)
    lens = [9, 4, 7, 6]
    B = len(lens)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in lens]
    P = max(lens)
    ids = torch.tensor([[0] * (P - n) + p for n, p in zip(lens, prompts, strict=True)])
    valid = torch.zeros(B, P + 2 * T + 2, dtype=torch.bool)
    for b, n in enumerate(lens):
        valid[b, P - n : P] = True
    pos = (valid[:, :P].long().cumsum(-1) - 1).clamp(min=0)
    cache = dec.new_cache(B, 4, mode)
    dec(ids, pos, valid[:, :P], cache, 0)
    nxt = pos[:, -1] + 1                                        # each row's next position
    s = P
    kept = [list(p) for p in prompts]
    lasts = ([-1, T - 1, min(1, T - 1), 0], [T - 1, -1, 0, min(2, T - 1)])
    for last in lasts:
        junk = torch.randint(3, V, (B, T), generator=g)
        valid[:, s : s + T] = True
        dec(junk, nxt[:, None] + torch.arange(T), valid[:, : s + T], cache, s)
        last = torch.tensor(last)
        cache.keep(last)
        valid[:, s : s + T] = torch.arange(T) <= last[:, None]
        for b in range(B):
            kept[b] += junk[b, : last[b] + 1].tolist()
        nxt, s = nxt + last + 1, s + T
    tail: list[list[int]] = [[] for _ in range(B)]
    for _ in range(2):                                          # two tokens on, past the convolution window
        tok = torch.randint(3, V, (B, 1), generator=g)
        valid[:, s] = True
        logits = dec.logits(dec(tok, nxt[:, None], valid[:, : s + 1], cache, s))[:, 0]
        for b in range(B):
            kept[b].append(int(tok[b, 0]))
            tail[b].append(int(tok[b, 0]))
            torch.testing.assert_close(logits[b], _full_logits(model, kept[b]), atol=2e-5, rtol=1e-5)
        nxt, s = nxt + 1, s + 1
    # not vacuous: the junk a row kept changes its logits (row 1 kept T + 0 junk tokens)
    assert not torch.allclose(logits[1], _full_logits(model, prompts[1] + tail[1]), atol=1e-2)


@torch.inference_mode()
def test_keep_keeps_nothing_or_everything_as_committing_does(hybrid):
    """keep(T−1) for every row equals a forward not followed by keep (the next forward keeps all); keep(−1) for
    every row equals never having run the junk forward."""
    model = hybrid
    dec = hybrid_decoder(model)
    ids, mask, pos = left_padded(model.config.vocab_size, 10, seed=3)
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[:, :10] = mask.bool()
    junk = torch.randint(3, model.config.vocab_size, (3, 3), generator=torch.Generator().manual_seed(4))
    nxt = pos[:, -1:] + 1
    for mode in MODES:
        a, b, c = (dec.new_cache(3, 16, mode) for _ in range(3))
        for cache in (a, b, c):
            dec(ids, pos, valid[:, :10], cache, 0)
        for cache in (a, b):
            dec(junk, nxt + torch.arange(3), valid[:, :13], cache, 10)
        a.keep(torch.full((3,), 2))
        out_a = dec(junk[:, :1], nxt + 3, valid[:, :14], a, 13)
        out_b = dec(junk[:, :1], nxt + 3, valid[:, :14], b, 13)      # b: committed by this forward
        torch.testing.assert_close(out_a, out_b, atol=0, rtol=0)
        d = dec.new_cache(3, 16, mode)
        dec(ids, pos, valid[:, :10], d, 0)
        dec(junk, nxt + torch.arange(3), valid[:, :13], d, 10)
        d.keep(torch.full((3,), -1))
        holes = valid.clone()
        holes[:, 10:13] = False
        torch.testing.assert_close(dec(junk[:, :1], nxt, holes[:, :14], d, 13),
                                   dec(junk[:, :1], nxt, valid[:, :11], c, 10), atol=1e-6, rtol=1e-6)


def test_misuse_is_refused(tiny_tokenizer):
    qwen35 = build_hybrid("qwen3_5", tiny_tokenizer)
    other = build_hybrid("qwen3_5", tiny_tokenizer, seed=1)
    dec, dec_other = hybrid_decoder(qwen35), hybrid_decoder(other)
    assert dec is not dec_other
    ids = torch.tensor([[5, 6, 7]])
    pos = torch.arange(3)[None]
    valid = torch.ones(1, 3, dtype=torch.bool)
    with torch.inference_mode():
        with pytest.raises(BebopError, match="another model's decoder.*new_cache"):
            dec(ids, pos, valid, dec_other.new_cache(1, 8), 0)
        with pytest.raises(BebopError, match="unknown linear-state mode 'stash'.*store, recompute"):
            dec.new_cache(1, 8, "stash")
        cache = dec.new_cache(1, 8)
        with pytest.raises(BebopError, match="keep\\(\\) called with no pending forward"):
            cache.keep(torch.tensor([0]))
        dec(ids, pos, valid, cache, 0)
        with pytest.raises(BebopError, match="a prefill keeps every token.*cannot be rolled back"):
            cache.keep(torch.tensor([2]))                            # a prefill is never rolled back
        cache = dec.new_cache(1, 8)
        dec(ids, pos, valid, cache, 0)
        dec(ids, pos + 3, torch.ones(1, 6, dtype=torch.bool), cache, 3)
        cache.keep(torch.tensor([2]))
        with pytest.raises(BebopError, match="keep\\(\\) called with no pending forward"):
            cache.keep(torch.tensor([2]))                            # a second keep of the same forward
        long = torch.randint(3, 50, (1, STEPWISE_MAX + 1))
        cache = dec.new_cache(1, 8)
        dec(long, torch.arange(STEPWISE_MAX + 1)[None], torch.ones(1, STEPWISE_MAX + 1, dtype=torch.bool), cache, 0)
        with pytest.raises(BebopError, match="a prefill keeps every token.*cannot be rolled back"):
            cache.keep(torch.tensor([0]))
