"""``engine.dispatch.decode`` picks plain, MTP or multi-turn decoding from its arguments and returns exactly what
the picked function returns."""

from __future__ import annotations

import torch
from laws import prompts_for

from bebop.core.sampling import SamplingParams
from bebop.engine.decode import generate, generate_mtp
from bebop.engine.dispatch import DecodeConfig, Turns, decode
from bebop.engine.turns import generate_turns


def env(row: int, transcript: list[int]) -> list[int]:
    return [5, 6]


def test_decode_picks_plain_mtp_or_multi_turn(peaky, tiny_tokenizer):  # noqa: F811
    model, head = peaky
    prompts, _ = prompts_for(tiny_tokenizer, 4)
    params = SamplingParams(temperature=1.0)

    def cfg():
        return DecodeConfig(params, 12, None, gamma=2, rule="target_only", generator=torch.Generator().manual_seed(0))

    def gen():
        return torch.Generator().manual_seed(0)

    cases = [
        (decode(model, None, prompts, cfg()), generate(model, prompts, params, 12, None, generator=gen())),
        (decode(model, head, prompts, cfg()),
         generate_mtp(model, head, prompts, params, 12, None, 2, "target_only", generator=gen())),
        (decode(model, head, prompts, cfg(), Turns(env, 7, turn_tokens=6)),
         generate_turns(model, head, prompts, params, 12, None, 7, env, 2, "target_only", generator=gen(),
                        turn_tokens=6)),
    ]
    for got, want in cases:
        assert type(got) is type(want)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logprobs, want.logprobs)
    assert cases[0][0].metrics.draft_forwards == 0 < cases[1][0].metrics.draft_forwards
    turns = cases[2][0]
    assert int(turns.turns.sum()) > 0 and torch.equal(turns.sampled_mask, turns.sampled)
    assert not turns.sampled_mask[turns.mask].all()            # environment tokens are not sampled
    assert torch.equal(cases[0][0].sampled_mask, cases[0][0].mask)


def test_a_batch_too_large_for_memory_is_refused_before_decoding(peaky, tiny_tokenizer, monkeypatch):
    """Under a memory limit every kind of call is refused up front, naming the batch that would fit; continuous
    batching needs memory for its slots only, so the same rows fit through fewer slots."""
    import pytest

    import bebop.engine.dispatch as dispatch
    from bebop.errors import BebopError

    model, head = peaky
    prompts, _ = prompts_for(tiny_tokenizer, 64)
    cfg = DecodeConfig(SamplingParams(), 40, None, gamma=3)
    need = dispatch.check_memory(model, head, prompts[:8], cfg)
    monkeypatch.setenv("BEBOP_MEMORY_LIMIT", str(int(need["total"] / 0.9) + 1))   # 8 rows fit, 64 do not
    calls = []
    monkeypatch.setattr(dispatch, "mtp_decode", lambda *a, **k: calls.append(a))
    with pytest.raises(BebopError, match=r"a batch of 64 rows over .* the largest batch that fits is (8|9|10)\b"):
        decode(model, head, prompts, cfg)
    with pytest.raises(BebopError, match="a batch of 64 rows"):
        decode(model, None, prompts, DecodeConfig(SamplingParams(), 200, None))
    assert not calls                                            # nothing decoded
    r = decode(model, head, prompts, cfg, slots=8)              # 8 slots fit
    assert r.tokens.shape[0] == 64
