"""The GPU cost benchmark (benchmarks/gpu_costs.py) runs its tiny shape on the CPU end to end, and its real shapes
have the sizes they claim (built on the meta device: no memory, no time)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_costs.py"


@pytest.fixture(scope="module")
def gpu_costs():
    spec = importlib.util.spec_from_file_location("gpu_costs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_shape_on_cpu_measures_and_projects(gpu_costs, tmp_path):
    acc = tmp_path / "eval.json"
    acc.write_text(json.dumps({"rejection": {"alpha": [0.9, 0.8, 0.7]}}))
    out = gpu_costs.main(["--device", "cpu", "--dtype", "float32", "--batch-sizes", "1,2", "--contexts", "16",
                          "--repeats", "1", "--acceptance", str(acc), "--rollout-share", "0.6",
                          "--json", str(tmp_path / "costs.json")])
    assert json.loads((tmp_path / "costs.json").read_text())["rows"] == out["rows"]
    assert out["inputs"]["accept_length"] == pytest.approx(1 + 0.9 + 0.72 + 0.504)
    assert len(out["rows"]) == 2
    for r in out["rows"]:
        assert r["c_1"] > 0 and r["c_verify"] > 0 and r["c_draft"] > 0
        s = out["inputs"]["accept_length"] * r["c_1"] / (r["c_verify"] + 3 * r["c_draft"])
        assert r["projected_decode_speedup"] == pytest.approx(s)
        assert r["projected_rl_step_speedup"] == pytest.approx(1 / (0.4 + 0.6 / s))


@pytest.mark.parametrize(("shape", "billions"), [("qwen3-8b", (8.1, 8.3)), ("qwen3.5-9b-like", (8.5, 9.5))])
def test_real_shapes_have_their_sizes(gpu_costs, shape, billions):
    model, head, cfg = gpu_costs.build(shape, "meta", torch.bfloat16)
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions[0] < n < billions[1]
    assert head.num_layers == 1
    one = gpu_costs.estimate_bytes(model, cfg, 1, 32768, 3)
    assert gpu_costs.estimate_bytes(model, cfg, 256, 32768, 3) > 10 * one > 10 * 2 * n * 1e9  # KV grows with B


def test_an_acceptance_file_of_another_kind_is_refused(gpu_costs, tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="neither a bench decode nor an eval-mtp JSON"):
        gpu_costs.main(["--device", "cpu", "--acceptance", str(bad)])
