"""``engine.slots``: hole slots are reused by compacting the caches, in static MTP decoding as in continuous batching,
without changing any output."""

from __future__ import annotations

import torch
from laws import exact_logprobs, prompts_for

import bebop.engine.decode as decode_module
import bebop.engine.slots as slots
from bebop.core.sampling import SamplingParams
from bebop.engine.decode import generate, generate_mtp


def spy_compactions(monkeypatch, module) -> list:
    """Records (length, longest) of every ``slots.compact`` that ``module`` calls."""
    calls: list = []
    real = slots.compact

    def spy(fw, st, held, longest):
        calls.append((st.length, longest))
        real(fw, st, held, longest)

    monkeypatch.setattr(module, "compact", spy)
    return calls


def test_wasteful_needs_both_the_share_and_the_minimum():
    assert not slots.wasteful(100, 95)                    # 5 holes: under 10 % and under COMPACT_MIN
    assert not slots.wasteful(1000, 985)                  # 15 holes: under the minimum of 16
    assert slots.wasteful(1000, 880)                      # 120 holes: 12 %
    assert not slots.wasteful(1000, 910)                  # 9 %
    assert not slots.wasteful(40, 0)                      # nothing held: nothing to keep


def test_static_mtp_decoding_compacts_its_caches_without_changing_outputs(peaky, tiny_tokenizer, monkeypatch):
    """Frequent compactions (any 2 hole columns, checked every 4 columns): τ = 0 outputs equal plain greedy decoding,
    τ = 1 log-probs equal a fresh forward, and the caches really shrank."""
    model, head = peaky
    monkeypatch.setattr(slots, "COMPACT_MIN", 2)
    monkeypatch.setattr(decode_module, "CHECK_EVERY", 4)
    calls = spy_compactions(monkeypatch, decode_module)
    prompts, _ = prompts_for(tiny_tokenizer, 6)
    greedy = SamplingParams(temperature=0.0)
    ref = generate(model, prompts, greedy, 40, eos_id=None)
    r = generate_mtp(model, head, prompts, greedy, 40, eos_id=None, gamma=3, rule="target_only")
    assert torch.equal(r.tokens, ref.tokens)
    params = SamplingParams(temperature=1.0, top_k=20)
    calls.clear()
    r = generate_mtp(model, head, prompts, params, 40, eos_id=None, gamma=3, generator=torch.Generator().manual_seed(0))
    assert calls and all(longest < length for length, longest in calls)
    for b, comp in enumerate(r.completions()):
        torch.testing.assert_close(r.logprobs[b], exact_logprobs(model, prompts[b], comp, params), atol=2e-4, rtol=0)


def test_static_multi_turn_decoding_compacts_without_changing_outputs(peaky, tiny_tokenizer, monkeypatch):
    """The static multi-turn engine compacts at its step sync (finished rows' slots are dropped): at τ = 1 every model
    token's log-prob still equals a fresh forward, with environment replies in the transcripts."""
    import bebop.engine.turns as turns_module
    from bebop.engine.turns import generate_turns

    model, head = peaky
    monkeypatch.setattr(slots, "COMPACT_MIN", 2)
    calls = spy_compactions(monkeypatch, turns_module)
    prompts, _ = prompts_for(tiny_tokenizer, 8)
    params = SamplingParams(temperature=1.0, top_k=20)
    replies = {row: [5, 6][: row % 3] for row in range(8)}
    r = generate_turns(model, head, prompts, params, 30, None, 7, lambda row, t: replies[row], gamma=3,
                       generator=torch.Generator().manual_seed(0))
    assert calls and int(r.turns.sum()) >= 2
    for b, comp in enumerate(r.completions()):
        m = r.sampled[b, : len(comp)]
        ref = exact_logprobs(model, prompts[b], comp, params)
        torch.testing.assert_close(r.logprobs[b, : len(comp)][m], ref[m], atol=2e-4, rtol=0)
