"""``--device`` / ``--dtype`` on the command line, in-process: accepted end to end, float16 on the CPU refused with
one clear error line, and the decoding path said once."""

from __future__ import annotations

import sys

import pytest
import torch
from typer.testing import CliRunner

from bebop.cli import app
from bebop.cli.render import run_app
from bebop.errors import BebopError

FP16_ON_CPU = "dtype 'float16': float16 is not supported on CPU; use bfloat16 or float32"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "160"})


def test_generate_runs_on_cpu_in_bfloat16_and_says_which_path(dirs):
    r = invoke("generate", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--n", "2",
               "--max-new-tokens", "6", "--device", "cpu", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    assert r.output.count("decoding with the lean path (Qwen3, bfloat16 on cpu)") == 1
    assert "backend" in r.output and "lean" in r.output          # the metrics table records the path


def test_generate_backend_lean_is_accepted_on_qwen3_and_unknown_backends_are_refused(dirs):
    ok = invoke("generate", "--model", str(dirs / "base"), "--n", "1", "--max-new-tokens", "3", "--backend", "lean")
    assert ok.exit_code == 0, ok.output
    bad = invoke("generate", "--model", str(dirs / "base"), "--n", "1", "--backend", "fast")
    assert bad.exit_code != 0 and isinstance(bad.exception, BebopError) and "'fast'" in str(bad.exception)


@pytest.mark.parametrize("args", [
    ("eval", "{base}", "--samples", "1"),
    ("generate", "--model", "{base}", "--n", "1"),
    ("train-mtp", "--model", "{base}", "--out", "{tmp}/h", "--steps", "1"),
])
def test_float16_on_cpu_is_one_clear_error(dirs, tmp_path, args):
    if torch.cuda.is_available():
        pytest.skip("float16 is refused only on the CPU")
    argv = [a.format(base=dirs / "base", tmp=tmp_path) for a in args] + ["--device", "cpu", "--dtype", "float16"]
    r = invoke(*argv)
    assert r.exit_code != 0 and isinstance(r.exception, BebopError) and FP16_ON_CPU in str(r.exception)
    assert not (tmp_path / "h").exists()                               # refused before anything is written


def test_the_entry_point_prints_one_error_line_and_exits_2(dirs, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bebop", "generate", "--model", str(dirs / "base"), "--device", "cpu",
                                      "--dtype", "float16"])
    with pytest.raises(SystemExit) as e:
        run_app(app)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {FP16_ON_CPU}"


def test_bad_device_names_the_value(dirs):
    r = invoke("eval", str(dirs / "base"), "--device", "gpu0")
    assert r.exit_code != 0 and isinstance(r.exception, BebopError) and "unknown device 'gpu0'" in str(r.exception)
