"""``--device`` / ``--dtype`` resolution, the training precision plan, and ``load_policy`` on a device in a dtype."""

from __future__ import annotations

import pytest
import torch

from bebop.config import check_device, check_dtype
from bebop.errors import BebopError
from bebop.models.device import precision, resolve_device, resolve_dtype
from bebop.models.policy import load_policy, save_policy

CUDA = torch.cuda.is_available()


def test_auto_device_is_cuda_when_available_else_cpu():
    assert resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cpu:0", "", "CUDA"])
def test_bad_device_names_the_value(spec):
    with pytest.raises(BebopError, match=f"unknown device {spec!r}"):
        resolve_device(spec)
    with pytest.raises(BebopError, match="auto, cpu, cuda, cuda:<i>"):
        check_device(spec)


@pytest.mark.skipif(CUDA, reason="checks the error where CUDA is absent")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_an_error(spec):
    with pytest.raises(BebopError, match=f"device {spec!r} asked for, but CUDA is not available"):
        resolve_device(spec)


def test_auto_dtype_is_float32_on_cpu_and_names_resolve():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("float32", "cpu") is torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype(torch.bfloat16, "cpu") is torch.bfloat16   # torch dtypes pass through the same checks
    if CUDA:
        assert resolve_dtype("auto", "cuda") is torch.bfloat16
        assert resolve_dtype("float16", "cuda") is torch.float16


def test_float16_on_cpu_is_refused_with_the_fix():
    for spec in ("float16", torch.float16):
        with pytest.raises(BebopError, match="'float16': float16 is not supported on CPU; use bfloat16 or float32"):
            resolve_dtype(spec, "cpu")


@pytest.mark.parametrize("spec", ["fp8", "bf16", "half", "float64"])
def test_unknown_dtype_lists_the_choices(spec):
    with pytest.raises(BebopError, match=rf"unknown dtype {spec!r}; choose one of: auto, float32, bfloat16, float16"):
        resolve_dtype(spec, "cpu")
    with pytest.raises(BebopError, match=f"{spec!r}"):
        check_dtype(spec)
    with pytest.raises(BebopError, match="unsupported dtype torch.float64"):
        resolve_dtype(torch.float64, "cpu")


def test_precision_autocasts_only_below_float32():
    fp32, bf16 = precision("cpu", "float32"), precision("cpu", "bfloat16")
    assert (fp32.mixed, bf16.mixed, fp32.name, bf16.name) == (False, True, "float32", "bfloat16")
    w, x = torch.randn(4, 4), torch.randn(2, 4)
    with fp32.autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert (x @ w).dtype is torch.float32
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert (x @ w).dtype is torch.bfloat16       # matmuls in bf16, weights untouched in float32
    assert w.dtype is torch.float32
    assert not bf16.grad_scaler().is_enabled()       # bf16 has float32's range: no loss scaling


def test_load_policy_in_bfloat16_gives_bfloat16_weights_with_close_logits(tiny_model, tiny_tokenizer, tmp_path):
    save_policy(tiny_model, tiny_tokenizer, tmp_path / "m")
    default, _ = load_policy(tmp_path / "m")                    # auto on a CPU machine: float32 on cpu
    bf16, tok = load_policy(tmp_path / "m", device="cpu", dtype="bfloat16")
    if not CUDA:
        assert {p.dtype for p in default.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.device == torch.device("cpu") and not bf16.training
    x = torch.tensor([tok("Q: 1+2*3\n")["input_ids"]])
    with torch.no_grad():
        ref = tiny_model(x).logits
        got = bf16(x).logits.float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_load_policy_checks_device_and_dtype_before_reading(tiny_model, tiny_tokenizer, tmp_path):
    save_policy(tiny_model, tiny_tokenizer, tmp_path / "m")
    with pytest.raises(BebopError, match="float16 is not supported on CPU"):
        load_policy(tmp_path / "m", device="cpu", dtype="float16")
    with pytest.raises(BebopError, match="unknown dtype 'int8'"):
        load_policy(tmp_path / "missing", dtype="int8")
    with pytest.raises(BebopError, match="model directory not found"):   # the existing errors are unchanged
        load_policy(tmp_path / "missing", dtype="bfloat16")
