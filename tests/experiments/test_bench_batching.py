"""`bench batching`: static and continuous batching on the same rows, with utilization counted the same way."""

from __future__ import annotations

import json

import pytest
from conftest import cli

from bebop.engine.metrics import DecodeMetrics
from bebop.errors import BebopError
from bebop.experiments.bench_batching import bench_batching, static_utilization
from bebop.experiments.options import BatchingBenchConfig


def test_static_utilization_counts_live_rows_per_slot():
    # two rows, lengths 4 and 2: 3 decode forwards after the prefill; live row-steps 3 + 1 = 4 of 2·3 slots
    assert static_utilization(DecodeMetrics(tokens=6, target_forwards=3), 2, mtp=False) == pytest.approx(4 / 6)
    # MTP: 5 verify row-steps over 4 verify forwards of 2 slots
    assert static_utilization(DecodeMetrics(steps=5, target_forwards=4), 2, mtp=True) == pytest.approx(5 / 8)


def test_bench_batching_decodes_the_same_rows_both_ways(tiny_model, tiny_tokenizer):
    from bebop.models.mtp import MTPHead

    head = MTPHead.from_base(tiny_model).eval()
    cfg = BatchingBenchConfig(batch=3, prompts=4, group_size=2, max_new_tokens=12, repeats=1)
    res = bench_batching(tiny_model, tiny_tokenizer, head, cfg)
    assert res["rows"] == 8
    for kind in ("plain", "mtp"):
        for mode in ("static", "continuous"):
            r = res[kind][mode]
            assert r["tokens"] > 8 and r["tokens_per_s"] > 0 and 0 < r["utilization"] <= 1
            assert r["completion_tokens"]["max"] <= 12
        assert res[kind]["continuous"]["prefills"] >= 2 and res[kind]["static"]["prefills"] == 3
        assert res[kind]["continuous"]["slots_per_token"] >= 1
    assert res["mtp"]["static"]["accept_length"] >= 1 and res["plain"]["static"]["accept_length"] is None
    assert res["mtp_speedup"]["static"] == pytest.approx(res["mtp"]["static"]["tokens_per_s"] /
                                                         res["plain"]["static"]["tokens_per_s"])


@pytest.mark.parametrize(("field", "value"), [("batch", 0), ("group_size", 0), ("rule", "fast"), ("gamma", 0)])
def test_bad_options_are_one_clear_error(field, value):
    with pytest.raises(BebopError, match=str(value)):
        BatchingBenchConfig(**{field: value})


@pytest.mark.slow
def test_bench_batching_cli_prints_the_table_and_writes_its_json(dirs, tmp_path):
    out = tmp_path / "b.json"
    r = cli("bench", "batching", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--prompts", "2",
            "--group-size", "2", "--batch", "3", "--max-new-tokens", "6", "--repeats", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["config"]["batch"] == 3 and data["results"]["rows"] == 4
    assert "continuous / static" in r.stdout and "utilization" in r.stdout
