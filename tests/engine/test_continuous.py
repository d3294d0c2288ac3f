"""Continuous batching: rows that join mid-run keep the plain-sampling law; outputs come back in request order; the
caches are compacted without changing any row's output."""

from __future__ import annotations

import pytest
import torch
from laws import P_FALSE_ALARM, chisq_pvalue, exact_logprobs, prompts_for, sequence_law_eos

import bebop.engine.continuous as continuous
import bebop.engine.slots as slots_module
from bebop.core.sampling import SamplingParams
from bebop.engine.continuous import continuous_decode
from bebop.engine.decode import DecodeConfig, generate, generate_mtp
from bebop.engine.turns import Turns, turns_decode
from bebop.errors import BebopError
from bebop.models.families import build_family_policy
from bebop.models.mtp import MTPHead
from bebop.models.policy import ModelConfig

GREEDY = SamplingParams(temperature=0.0)
SHAPES = {"qwen3": ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64),
          "qwen3_5": ModelConfig(num_layers=4, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64),
          "deepseek_v3": ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1,
                                     intermediate_size=64)}
GAINS = {"qwen3": (10.0, 1), "qwen3_5": (5.0, 2), "deepseek_v3": (10.0, 1)}   # (layer gain, seed): varied paths


def lively_policy(arch: str, tokenizer):
    """A tiny random ``arch`` policy whose greedy path varies (sharpened tied logits, layer matrices × a gain, as
    ``test_families_engine`` and ``test_hybrid_engine`` build them) and its warm-started head."""
    gain, seed = GAINS[arch]
    torch.manual_seed(seed)
    model = build_family_policy(arch, SHAPES[arch], tokenizer).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(6.0)
        for p in model.get_decoder().layers.parameters():
            if p.dim() >= 2:
                p.mul_(gain)
    return model, MTPHead.from_base(model).eval()


@pytest.fixture(scope="module", params=["qwen3", "qwen3_5", "deepseek_v3"])
def lively(request, tiny_tokenizer):
    return lively_policy(request.param, tiny_tokenizer)


def varied_prompts(tok, n):
    """``n`` prompts of several lengths (so joiners are left-padded differently from the rows they join)."""
    texts = ["Q: 1+2\n", "Q: 12*3-4\n", "Q: 7\n", "Q: (5+6)*(7-1)/2\n", "Q: 9-8+7\n"]
    return [tok(texts[i % len(texts)])["input_ids"] for i in range(n)]


def an_eos(model, prompts, length=12):
    """A token that greedy decoding emits partway through some rows, so rows end at different steps."""
    toks = generate(model, prompts, GREEDY, length, eos_id=None).tokens
    return int(toks[0, 5])


def spy_compactions(monkeypatch) -> list:
    """Records every compaction, made frequent (any 2 hole columns) so that tests exercise it many times."""
    monkeypatch.setattr(slots_module, "COMPACT_MIN", 2)
    calls: list = []
    real = continuous._compact

    def spy(fw, st, sl, longest):
        calls.append((st.length, longest))
        real(fw, st, sl, longest)

    monkeypatch.setattr(continuous, "_compact", spy)
    return calls


@pytest.mark.parametrize("rule", ["plain", "greedy", "rejection", "target_only"])
def test_greedy_continuous_equals_static_decoding_in_request_order(lively, tiny_tokenizer, rule, monkeypatch):
    model, head = lively
    prompts = varied_prompts(tiny_tokenizer, 9)
    eos = an_eos(model, prompts)
    ref = generate(model, prompts, GREEDY, 40, eos_id=eos)
    assert len(set(ref.lengths.tolist())) >= 3                   # rows end at different steps: slots free unevenly
    calls = spy_compactions(monkeypatch)
    dc = DecodeConfig(GREEDY, 40, eos, gamma=3, rule="greedy" if rule == "plain" else rule)
    r = continuous_decode(model, None if rule == "plain" else head, prompts, dc, slots=3)
    assert torch.equal(r.lengths, ref.lengths)
    assert torch.equal(r.tokens * r.mask, ref.tokens * ref.mask)
    assert r.metrics.prefills >= 4 and calls                      # rows joined in several groups; caches compacted
    assert 0 < r.metrics.utilization <= 1


@pytest.mark.parametrize("rule", ["rejection", "target_only"])
def test_late_rows_logprobs_match_a_full_forward(lively, tiny_tokenizer, rule, monkeypatch):
    """τ = 1: every returned log-prob, of the first rows and of those that joined late, equals a fresh forward."""
    model, head = lively
    prompts = varied_prompts(tiny_tokenizer, 7)
    params = SamplingParams(temperature=1.0, top_k=20)
    eos = an_eos(model, prompts)
    calls = spy_compactions(monkeypatch)
    dc = DecodeConfig(params, 30, eos, 3, rule, generator=torch.Generator().manual_seed(0))
    r = continuous_decode(model, head, prompts, dc, slots=2)
    assert r.metrics.prefills >= 3 and calls and r.metrics.drafted > 0
    for b, comp in enumerate(r.completions()):
        assert comp and len(comp) <= 30
        assert comp[-1] == eos or len(comp) == 30
        assert eos not in comp[:-1]
        torch.testing.assert_close(r.logprobs[b, : len(comp)], exact_logprobs(model, prompts[b], comp, params),
                                   atol=2e-4, rtol=0)


def test_adaptive_drafting_policy_under_continuous_batching(tiny_tokenizer):
    from bebop.experimental.adaptive import AdaptiveDraft

    model, head = lively_policy("qwen3", tiny_tokenizer)
    prompts = varied_prompts(tiny_tokenizer, 8)
    eos = an_eos(model, prompts)
    ref = generate(model, prompts, GREEDY, 30, eos_id=eos)
    policy = AdaptiveDraft([0.9, 0.8, 0.7, 0.6, 0.5])
    r = continuous_decode(model, head, prompts, DecodeConfig(GREEDY, 30, eos, policy, "auto"), slots=3)
    assert torch.equal(r.tokens * r.mask, ref.tokens * ref.mask)
    params = SamplingParams(temperature=1.0)
    r = continuous_decode(model, head, prompts, DecodeConfig(params, 30, eos, policy, "auto",
                                                              generator=torch.Generator().manual_seed(1)), slots=3)
    for b, comp in enumerate(r.completions()):
        torch.testing.assert_close(r.logprobs[b, : len(comp)], exact_logprobs(model, prompts[b], comp, params),
                                   atol=2e-4, rtol=0)


def test_transformers_backend_continuous_equals_static(tiny_tokenizer):
    model, head = lively_policy("qwen3", tiny_tokenizer)
    prompts = varied_prompts(tiny_tokenizer, 6)
    eos = an_eos(model, prompts)
    ref = generate_mtp(model, head, prompts, GREEDY, 30, eos_id=eos, gamma=2, backend="transformers")
    r = continuous_decode(model, head, prompts, DecodeConfig(GREEDY, 30, eos, 2, "greedy",
                                                              backend="transformers"), slots=2)
    assert torch.equal(r.tokens * r.mask, ref.tokens * ref.mask)


def test_more_slots_than_prompts_is_one_static_batch(peaky, tiny_tokenizer):
    model, head = peaky
    prompts = varied_prompts(tiny_tokenizer, 3)
    r = continuous_decode(model, head, prompts, DecodeConfig(GREEDY, 10, None, 3, "greedy"), slots=64)
    ref = generate(model, prompts, GREEDY, 10, eos_id=None)
    assert torch.equal(r.tokens, ref.tokens) and r.metrics.prefills == 1


@pytest.mark.parametrize("slots", [0, -1, 2.5, True])
def test_bad_slot_count_is_one_clear_error(peaky, slots):
    model, head = peaky
    with pytest.raises(BebopError, match=f"slots .* got {slots!r}"):
        continuous_decode(model, head, [[1, 2]], DecodeConfig(GREEDY, 4, None), slots=slots)


@pytest.mark.slow
@pytest.mark.parametrize(("rule", "temperature", "top_p"), [("rejection", 1.0, None), ("target_only", 0.8, 0.9)])
def test_rows_joining_mid_run_have_the_plain_sampling_law(peaky, tiny_tokenizer, rule, temperature, top_p):
    """10^5 requests of up to 3 tokens through 256 slots, EOS = the likeliest first token (rows end after 1, 2 or 3
    tokens, so nearly every request joins mid-run, next to rows at other depths), against the exact law with EOS."""
    model, head = peaky
    n, length = 100_000, 3
    prompts, (pa, pb) = prompts_for(tiny_tokenizer, n)
    params = SamplingParams(temperature=temperature, top_p=top_p)
    from bebop.core.sampling import probs_from_logits

    with torch.no_grad():
        eos = int(probs_from_logits(model(torch.tensor([pa])).logits[0, -1], params).argmax())
    dc = DecodeConfig(params, length, eos, 2, rule, 0,
                      torch.Generator().manual_seed(11))
    r = continuous_decode(model, head, prompts, dc, slots=256)
    assert r.metrics.prefills > 300
    ends = r.lengths.bincount(minlength=length + 1)
    assert (ends[1:] > 500).all()                                # rows end at every step
    V = model.config.vocab_size
    t = r.tokens
    codes = (t[:, 0] * V * V + t[:, 1] * V + t[:, 2]).numpy()
    for parity, prompt in ((0, pa), (1, pb)):
        law = sequence_law_eos(model, prompt, params, length, eos, 0)
        assert chisq_pvalue(codes[parity::2], law) > P_FALSE_ALARM


# ---------------------------------------------------------------------------------------------- multi-turn


def multi_turn_rows(tok, n):
    """``n`` prompts and per-row environment replies of ragged lengths (none for some rows)."""
    prompts = varied_prompts(tok, n)
    kinds = ([5, 6], [5], [], [6, 5, 6, 5, 6, 5, 6], [5, 6, 5], [6])
    return prompts, {row: kinds[row % 6] for row in range(n)}


@pytest.mark.parametrize("strategy", ["none", "rejection", "target_only"])
def test_multi_turn_continuous_equals_static_turns_at_greedy(tiny_tokenizer, strategy):
    """τ = 0: continuous multi-turn rollouts (rows pausing for the environment while others decode or join) equal
    the static multi-turn engine's transcripts, sampled masks and turn counts, row for row."""
    model, head = lively_policy("qwen3", tiny_tokenizer)
    prompts, replies = multi_turn_rows(tiny_tokenizer, 12)
    ref0 = generate(model, prompts, GREEDY, 30, eos_id=None).tokens
    stop = int(ref0[1, 3])                                       # a terminator the greedy paths emit partway
    eos = int(ref0[0, 9]) if int(ref0[0, 9]) != stop else None
    turns = Turns(lambda row, t: replies[row], stop, turn_tokens=12, max_turns=3)
    dc = DecodeConfig(GREEDY, 40, eos, 3, "greedy" if strategy == "none" else strategy)
    h = None if strategy == "none" else head
    ref = turns_decode(model, h, prompts, dc, turns)
    r = continuous_decode(model, h, prompts, dc, slots=4, turns=turns)
    assert int(ref.turns.sum()) >= 6 and r.metrics.prefills >= 3
    assert torch.equal(r.lengths, ref.lengths) and torch.equal(r.turns, ref.turns)
    w = int(ref.lengths.max())
    assert torch.equal(r.tokens[:, :w] * r.mask[:, :w], ref.tokens[:, :w] * ref.mask[:, :w])
    assert torch.equal(r.sampled[:, :w], ref.sampled[:, :w])
    assert r.metrics.tokens == ref.metrics.tokens


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_5"])
def test_multi_turn_continuous_logprobs_match_a_full_forward(tiny_tokenizer, arch):
    """τ = 1: every model token's log-prob equals a fresh forward over prompt + transcript; environment tokens are
    not sampled and carry log-prob 0."""
    model, head = lively_policy(arch, tiny_tokenizer)
    prompts, replies = multi_turn_rows(tiny_tokenizer, 10)
    params = SamplingParams(temperature=1.0, top_k=8)
    sample = generate(model, prompts, params, 30, eos_id=None, generator=torch.Generator().manual_seed(1)).tokens
    stop = int(sample.flatten().mode().values)                  # the likeliest terminator under sampling
    dc = DecodeConfig(params, 36, None, 3, "rejection", generator=torch.Generator().manual_seed(2))
    r = continuous_decode(model, head, prompts, dc, slots=3, turns=Turns(lambda row, t: replies[row], stop))
    assert int(r.turns.sum()) >= 3 and r.metrics.prefills >= 3
    for b, comp in enumerate(r.completions()):
        m = r.sampled[b, : len(comp)]
        assert (~m).sum() > 0 or r.turns[b] == 0 or not replies[b]
        ref = exact_logprobs(model, prompts[b], comp, params)
        torch.testing.assert_close(r.logprobs[b, : len(comp)][m], ref[m], atol=2e-4, rtol=0)
        assert (r.logprobs[b, : len(comp)][~m] == 0).all()


@pytest.mark.slow
def test_multi_turn_rows_joining_mid_run_have_the_plain_sampling_law(peaky, tiny_tokenizer):
    """4·10⁴ transcripts (budget 4 transcript tokens, the toy environment inserting 2 after every terminator)
    through 256 slots against their exact law (``test_multiturn_engine.transcript_law``)."""
    from test_multiturn_engine import STOP, law_pvalue, toy_env, transcript_law

    model, head = peaky
    n, budget = 40_000, 4
    prompts, (pa, pb) = prompts_for(tiny_tokenizer, n)
    params = SamplingParams(temperature=1.0)
    dc = DecodeConfig(params, budget, None, 2, "rejection", generator=torch.Generator().manual_seed(5))
    r = continuous_decode(model, head, prompts, dc, slots=256, turns=Turns(toy_env, STOP))
    assert float((r.turns > 0).float().mean()) > 0.2 and r.metrics.prefills > 100
    comps = r.completions()
    for parity, prompt in ((0, pa), (1, pb)):
        assert law_pvalue(comps[parity::2], transcript_law(model, prompt, params, budget)) > P_FALSE_ALARM


def test_decode_seconds_leave_out_every_admission(peaky, tiny_tokenizer, monkeypatch):
    """Joiners' prefills are a prefill phase: ``decode_seconds`` leaves them out (as static decoding leaves out its
    one prefill), so a slow prefill costs ``seconds`` but not the decode phase."""
    import time

    model, head = peaky
    prompts = varied_prompts(tiny_tokenizer, 6)
    real, pause = continuous.prefill, 0.05

    def slow(*args, **kwargs):
        time.sleep(pause)
        return real(*args, **kwargs)

    monkeypatch.setattr(continuous, "prefill", slow)
    dc = DecodeConfig(SamplingParams(temperature=1.0), 6, None, 2, "rejection", tiny_tokenizer.pad_token_id,
                      torch.Generator().manual_seed(0))
    m = continuous_decode(model, head, prompts, dc, slots=2).metrics
    assert m.prefills >= 3                                   # the first batch and at least two admissions
    assert m.seconds - m.decode_seconds >= m.prefills * pause
    assert 0 < m.decode_seconds < (m.prefills - 1) * pause   # no admission's sleep is in the decode phase
