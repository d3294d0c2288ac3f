"""The in-process ``cli`` runner of the tests (tests/conftest.py) reports like the real ``bebop`` process: exit
status and the text of stdout and stderr, a BebopError as one ``error: …`` line and status 2, and it leaves no
global state behind for the tests that run after it."""

from __future__ import annotations

import random

import numpy as np
import torch
from conftest import cli

TINY = ["--task", "arith", "--steps", "1", "--batch-size", "2", "--eval-samples", "0", "--layers", "1", "--hidden",
        "32", "--heads", "2", "--kv-heads", "1", "--intermediate", "64", "--seed", "7"]


def test_a_run_prints_on_stdout_and_leaves_generators_and_threads_as_it_found_them(tmp_path):
    """``sft`` seeds torch's global generator and trains; afterwards every generator continues where it was."""
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    threads = torch.get_num_threads()
    r = cli("sft", *TINY, "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    assert "saved policy to" in r.stdout and r.stderr == ""
    assert (tmp_path / "p" / "model.safetensors").is_file()
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]
    assert torch.get_num_threads() == threads


def test_a_bebop_error_is_one_error_line_on_stderr_and_status_2(tmp_path):
    r = cli("sft", "--steps", "0", "--out", str(tmp_path / "x"))
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.strip().splitlines() == ["error: steps must be positive, got 0"]
    assert not (tmp_path / "x").exists()


def test_an_unexpected_exception_is_status_1_with_its_traceback(tmp_path, monkeypatch):
    import bebop.training.sft as sft_module

    def boom(cfg):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sft_module, "train_sft", boom)
    r = cli("sft", *TINY, "--out", str(tmp_path / "p"))
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "RuntimeError: disk on fire" in r.stderr


def test_a_usage_error_is_one_error_line_and_status_2_like_a_bebop_error():
    """click's usage errors (unknown flag, wrong type, missing option) skip its usage panel: one line, no box."""
    r = cli("sft", "--no-such-flag")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.strip().splitlines() == ["error: no such option: --no-such-flag"]
    r = cli("sft", "--steps", "abc")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: invalid value for '--steps': ") and "(got 'abc')" in r.stderr


def test_help_and_a_bare_group_still_show_help():
    r = cli("--help")
    assert r.returncode == 0 and "Usage: bebop" in r.stdout
    r = cli("bench")                                       # no_args_is_help: click's help, then status 2
    assert r.returncode == 2 and "decode" in r.stdout and r.stderr == ""
