"""Tests of the per-token cost against completion length benchmark (``bebop bench decode --lengths``)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli

from bebop.engine.decode import DecodeMetrics
from bebop.errors import BebopError
from bebop.experiments.bench_length import (
    LengthBenchConfig,
    bench_length,
    context_of,
    length_policy,
    slots_per_token,
    write_length_json,
)
from bebop.models.policy import ModelConfig

TINY = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def tiny_long(tiny_tokenizer):
    return length_policy(tiny_tokenizer, 64, TINY, seed=0)


def test_length_policy_has_the_context_and_a_bound_head(tiny_tokenizer, tiny_long) -> None:
    model, head = tiny_long
    assert context_of(model) == 64 and model.config.num_hidden_layers == 2
    assert not model.training and not head.training
    state = torch.random.get_rng_state()
    again, _ = length_policy(tiny_tokenizer, 64, TINY, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)            # the global RNG is left alone
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


def test_forced_lengths_plain_and_mtp(tiny_tokenizer, tiny_long, tmp_path) -> None:
    model, head = tiny_long
    cfg = LengthBenchConfig(lengths=(16, 32), batch_sizes=(1, 2), gamma=2, repeats=1, shape=TINY)
    res = bench_length(model, tiny_tokenizer, head, cfg)
    assert set(res) == {"1", "2"}
    for bs, r in res.items():
        assert set(r) == {"plain", "mtp", "speedup"} and set(r["speedup"]) == {"16", "32"}
        for mode in ("plain", "mtp"):
            rows = r[mode]
            assert [row["tokens"] for row in rows.values()] == [16 * int(bs), 32 * int(bs)]   # no EOS: exact
            assert [row["window"] for row in rows.values()] == ["0-16", "16-32"]
            r16, r32 = rows["16"], rows["32"]
            assert r16["growth"] == 1.0 and r32["growth"] == pytest.approx(r32["seconds_per_token"]
                                                                            / r16["seconds_per_token"])
            assert r32["window_seconds_per_token"] == pytest.approx(
                (r32["decode_seconds"] - r16["decode_seconds"]) / (r32["tokens"] - r16["tokens"]))
            assert all(row["seconds_per_token"] > 0 for row in rows.values())
        for row in r["plain"].values():
            assert row["target_forwards"] == row["length"] - 1
            if row["slots_per_token_source"] == "computed":   # one slot per token fed back: just under 1
                assert row["slots_per_token"] == pytest.approx(1 - int(bs) / (int(bs) * row["length"] + 5 * int(bs)),
                                                               abs=0.05)
        for row in r["mtp"].values():
            assert 1.0 <= row["accept_length"] <= 3.0
            assert row["slots_per_token_source"] in ("computed", "engine")
            # γ+1 = 3 slots per verify for accept-length tokens: between 1 and (γ+1) per kept token
            assert 0.9 <= row["slots_per_token"] <= 3.0
            assert row["target_forwards"] < row["length"]
    doc = write_length_json(tmp_path / "b" / "len.json", cfg, res, {"kind": "random-init"})
    assert json.loads((tmp_path / "b" / "len.json").read_text()) == json.loads(json.dumps(doc))


def test_slots_per_token_counts_holes() -> None:
    """Without compaction a row holds prompt + steps·(γ+1) slots for prompt + kept tokens."""
    m = DecodeMetrics(gamma=3, tokens=20, steps=10)        # 10 verifies, accept length 2 per row-step
    value, source = slots_per_token(m, [[1] * 5, [1] * 5], 3)
    assert source == "computed" and value == pytest.approx((10 + 10 * 4) / (10 + 20))
    plain, _ = slots_per_token(DecodeMetrics(tokens=20), [[1] * 5, [1] * 5], None)
    assert plain == pytest.approx((10 + 18) / (10 + 20))


def test_longest_length_beyond_the_context_fails_before_decoding(tiny_tokenizer, tiny_long) -> None:
    model, head = tiny_long
    with pytest.raises(BebopError, match="beyond the model's context of 64"):
        bench_length(model, tiny_tokenizer, head, LengthBenchConfig(lengths=(16, 60), batch_sizes=(1,)))


@pytest.mark.parametrize("kw, match", [
    ({"lengths": ()}, "lengths"), ({"lengths": (32, 16)}, "increasing"), ({"lengths": (0, 8)}, "lengths"),
    ({"batch_sizes": (0,)}, "batch sizes"), ({"rule": "nope"}, "'nope'"), ({"repeats": 0}, "repeats"),
    ({"task": "nope"}, "'nope'"), ({"gamma": 0}, "gamma"),
])
def test_bad_options_name_the_value(kw: dict, match: str) -> None:
    with pytest.raises(BebopError, match=match):
        LengthBenchConfig(**kw)


def test_cli_lengths_on_the_loaded_policy_and_on_a_built_one(dirs, tmp_path) -> None:
    """``bench decode --lengths``: the tiny saved policy (256 positions) holds 16 and 32 tokens and is measured
    itself; 300 tokens do not fit it, so a random-initialised toy-shape policy with 812 positions is built."""
    out = tmp_path / "len.json"
    base = ("bench", "decode", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--repeats", "1",
            "--json", str(out))
    r = cli(*base, "--gamma", "2", "--batch-sizes", "1,2", "--lengths", "16,32")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["policy"]["kind"] == "loaded" and doc["policy"]["context"] == 256
    assert set(doc["results"]) == {"1", "2"} and doc["config"]["lengths"] == [16, 32]
    assert doc["results"]["2"]["mtp"]["32"]["tokens"] == 64
    assert "ms/token" in r.stdout and "slots/token" in r.stdout
    r = cli(*base, "--batch-sizes", "1", "--lengths", "8,300")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["policy"]["kind"] == "random-init" and doc["policy"]["context"] == 812
    assert doc["policy"]["shape"]["num_layers"] == 8 and doc["results"]["1"]["plain"]["300"]["tokens"] == 300
    r = cli(*base, "--lengths", "16,8")
    assert r.returncode == 2 and "increasing" in r.stderr
    r = cli(*base, "--gamma", "auto", "--lengths", "16")
    assert r.returncode == 2 and "fixed" in r.stderr
