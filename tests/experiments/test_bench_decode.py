"""``bench decode`` with continuous batching: B slots that every prompt passes through, the limit at B rows."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bebop.errors import BebopError
from bebop.experiments.bench_decode import bench_decode
from bebop.experiments.options import DecodeBenchConfig
from bebop.models.mtp import MTPHead


@pytest.fixture(scope="module")
def head(tiny_model):
    return MTPHead.from_base(tiny_model).eval()


def test_continuous_batching_keeps_every_slot_live_without_eos(tiny_model, tiny_tokenizer, head):
    """Without EOS every row runs to the token limit. Static MTP rows still finish at different verify steps (their
    accept lengths differ), so their batch holds dead rows; slots that take the next prompt stay live except in
    the queue's last steps."""
    cfg = DecodeBenchConfig(batch_sizes=(3,), max_new_tokens=12, ignore_eos=True, repeats=1, num_prompts=9)
    static = bench_decode(tiny_model, tiny_tokenizer, head, cfg)["3"]
    cont = bench_decode(tiny_model, tiny_tokenizer, head, replace(cfg, continuous=True))["3"]
    assert static["batching"] == "static" and cont["batching"] == "continuous"
    assert cont["plain_row_utilization"] == 1.0          # plain rows of one length end together
    assert cont["mtp_row_utilization"] > static["mtp_row_utilization"]
    for r in (static, cont):
        assert r["fraction_of_limit"] == pytest.approx(r["decode_speedup"] / r["speedup_limit"])
        # the costs are timed again with half a 12-token completion (every row runs 12 tokens) after the prompt
        assert r["decode_context_extra_tokens"] == 6
        assert r["fraction_of_limit_at_decode_context"] == pytest.approx(
            r["decode_speedup"] / r["speedup_limit_at_decode_context"])
        assert r["c_verify_over_c_1_at_decode_context"] == pytest.approx(
            r["c_verify_at_decode_context"] / r["c_1_at_decode_context"])
        assert r["mtp_decode_tokens_per_s"] > 0 and len(r["alpha"]) == 3


def test_continuous_refuses_adaptive_gamma(tiny_model, tiny_tokenizer, head):
    cfg = DecodeBenchConfig(gamma="auto", batch_sizes=(2,), max_new_tokens=4, repeats=1, num_prompts=2,
                            continuous=True)
    with pytest.raises(BebopError, match="--continuous"):
        bench_decode(tiny_model, tiny_tokenizer, head, cfg)
