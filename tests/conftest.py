"""Shared fixtures: a tiny policy built in seconds (no downloads), torch on one thread for stable CI, and ``cli``:
the ``bebop`` command line run in this process (no interpreter, torch or transformers start-up per call)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import traceback
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from bebop.models.tokenizer import build_tokenizer
    from bebop.training.sft import task_corpus

    return build_tokenizer(task_corpus(n_per_task=100))


def build_tiny_policy(tokenizer, seed: int = 0, logit_scale: float = 1.0):
    """A 2-layer, 32-wide random Qwen3 policy; ``logit_scale`` > 1 sharpens its (tied) logits."""
    from bebop.models.policy import ModelConfig, build_policy

    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    model = build_policy(cfg, tokenizer).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(logit_scale)
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return build_tiny_policy(tiny_tokenizer)


@pytest.fixture(scope="module")
def peaky(tiny_tokenizer):
    """A tiny random policy with sharpened logits (so short sequences have few likely outcomes) + its head."""
    from bebop.models.mtp import MTPHead

    model = build_tiny_policy(tiny_tokenizer, seed=1, logit_scale=6.0)
    head = MTPHead.from_base(model).eval()
    return model, head


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tokenizer):
    """A tiny saved policy (``base``) and head (``head``) for CLI runs."""
    from bebop.models.checkpoint import save_head
    from bebop.models.mtp import MTPHead
    from bebop.models.policy import save_policy

    model = build_tiny_policy(tiny_tokenizer)
    root = tmp_path_factory.mktemp("bench")
    save_policy(model, tiny_tokenizer, root / "base")
    save_head(MTPHead.from_base(model), root / "head", model.config)
    return root


@dataclass(frozen=True)
class CliResult:
    """What a finished ``bebop`` run left: exit status and the text it wrote (the fields of CompletedProcess that
    the tests read)."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args: str) -> CliResult:
    """``bebop ARGS`` in this process through the real entry point :func:`bebop.cli.app.main` (so a BebopError is
    one ``error: …`` line on stderr and exit code 2), output captured by typer's CliRunner.

    A subprocess would start from clean global state, so the run leaves none behind: the torch, numpy and
    ``random`` generators, torch's thread count and transformers' progress-bar switch are restored afterwards,
    and the engine's decoding-path notice goes nowhere again (``report_paths(None)``, its state at start-up). An
    unexpected exception is exit code 1 with its traceback on stderr, as Python itself would report it. Tests
    whose point is the process itself (signals, imports, the ``python -m bebop.cli`` entry) use ``cli_process``."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()  # before imports that may draw
    from transformers.utils import logging as hf_logging
    from typer.testing import CliRunner

    from bebop.cli.app import main
    from bebop.engine.forwards import report_paths

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    code = 0
    with (CliRunner().isolation(env={"COLUMNS": "160"}) as (out, err, _),  # rich's width when not on a terminal
          mock.patch.object(sys, "argv", ["bebop", *args])):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:  # reported as an uncaught exception in a real process would be
            sys.stderr.write(traceback.format_exc())
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            torch.set_num_threads(threads)
            (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])
            report_paths(None)
        return CliResult(code, out.getvalue().decode(), err.getvalue().decode())


def cli_process(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m bebop.cli ARGS`` in a subprocess, output captured: for tests of the process itself. torch runs
    on one thread there too (``OMP_NUM_THREADS``): more threads than free cores only slow a shared machine down."""
    return subprocess.run([sys.executable, "-m", "bebop.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
