"""bebop.engine.memory: the estimate of a decoding call's memory agrees with what the engine's forwards really
allocate (target and head KV slots on the lean, hybrid and transformers paths, a hybrid model's linear state
before and during a verify in both state modes, the lean path's weight copies); ``BEBOP_MEMORY_LIMIT`` forces
the refusal, whose message names the batch and the largest batch that fits, and that batch passes; bad limits
are one clear error naming the value.

Models: the tiny Qwen3 policy (lean path), tiny Qwen3.5 and Qwen3-Next hybrids (``test_hybrid_engine``'s
shape: 3 Gated DeltaNet + 1 attention layer), DeepSeek-V3 (MLA) and GLM-4-MoE (transformers path), each with a
head from ``MTPHead.from_base``."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import build_tiny_policy
from transformers import DynamicCache

import bebop.engine.forwards as forwards_module
import bebop.models.mtp as mtp_module
from bebop.engine.forwards import forwards
from bebop.engine.memory import (
    LIMIT_ENV,
    available_bytes,
    check_batch_fits,
    decode_bytes,
    draws_ahead,
    format_bytes,
    parse_bytes,
)
from bebop.errors import BebopError
from bebop.models import lean
from bebop.models.families import build_family_policy
from bebop.models.hybrid import LinearState, hybrid_decoder
from bebop.models.lean import StaticKV
from bebop.models.mtp import MTPHead
from bebop.models.policy import ModelConfig

SHAPE = ModelConfig(num_layers=4, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
B, SLOTS, GAMMA, PROMPT = 5, 40, 3, 6


def nbytes(*tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@pytest.fixture(scope="module", params=["qwen3", "qwen3_5", "qwen3_next"])
def policy(request, tiny_tokenizer):
    torch.manual_seed(0)
    if request.param == "qwen3":
        model = build_tiny_policy(tiny_tokenizer)
    else:
        model = build_family_policy(request.param, SHAPE, tiny_tokenizer).eval()
    return request.param, model, MTPHead.from_base(model).eval()


@pytest.fixture
def recorded(monkeypatch):
    """Every StaticKV and LinearState built while the test runs, in creation order."""
    made: dict[str, list] = {"kv": [], "linear": []}
    for cls, key in ((StaticKV, "kv"), (LinearState, "linear")):
        real = cls.__init__

        def init(self, *args, _real=real, _key=key, **kwargs):
            _real(self, *args, **kwargs)
            made[_key].append(self)
        monkeypatch.setattr(cls, "__init__", init)
    return made


def held(s: LinearState) -> int:
    """Bytes one linear layer's state holds, what its last forward left pending included."""
    pending = s.states if isinstance(s.states, list) else [s.states]
    return nbytes(s.conv, s.rec, s.full, *pending, *(s.qkvgb or ()))


def within(estimate: int, actual: int, tol: float = 0.10) -> bool:
    return actual > 0 and abs(estimate - actual) <= tol * actual


def prompt_inputs(vocab: int, batch: int, length: int):
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(length).expand(batch, length)
    return ids, pos


@pytest.mark.parametrize("mode", ["store", "recompute"])
@torch.inference_mode()
def test_estimate_matches_the_caches_the_engine_allocates(policy, recorded, mode):
    """KV slots of the target and the head, and (hybrid) the linear state after the prefill and while a verify
    over γ+1 tokens is pending, summed over the tensors the engine's caches hold: within 10 % of the estimate."""
    arch, model, head = policy
    if arch == "qwen3" and mode == "recompute":
        pytest.skip("the linear-state mode concerns hybrid models only")
    est = decode_bytes(model, head, B, SLOTS, GAMMA, mode, prompt_len=PROMPT)
    assert est["path"] == ("lean" if arch == "qwen3" else "hybrid") and not est["estimate"]
    decoder = hybrid_decoder(model) if arch != "qwen3" else None
    old = decoder.mode if decoder is not None else None
    if decoder is not None:
        decoder.mode = mode
    try:
        fw = forwards(model, head, B, SLOTS, gamma=GAMMA)
        target_kv, head_kv = recorded["kv"]                      # the target's cache is made first
        assert within(est["target_kv"], nbytes(target_kv.k, target_kv.v))
        assert within(est["head_kv"], nbytes(head_kv.k, head_kv.v))
        assert (est["linear_state"] == 0) == (arch == "qwen3")
        if arch == "qwen3":
            return
        states = recorded["linear"]
        assert len(states) == 3
        assert within(est["linear_state"], sum(nbytes(s.conv, s.rec) for s in states))
        vocab = model.get_input_embeddings().weight.shape[0]
        ids, pos = prompt_inputs(vocab, B, PROMPT)
        valid = torch.ones((B, SLOTS), dtype=torch.bool)
        fw.target(ids, pos, valid[:, :PROMPT], 0)
        assert within(est["linear_state"] + est["prefill_state"], sum(held(s) for s in states))
        vids, vpos = ids[:, : GAMMA + 1], pos[:, : GAMMA + 1] + PROMPT
        fw.target(vids, vpos, valid[:, : PROMPT + GAMMA + 1], PROMPT)      # a verify, its states pending
        assert within(est["linear_state"] + est["step_state"], sum(held(s) for s in states))
        fw.keep(torch.full((B,), 1))
        assert within(est["linear_state"], sum(held(s) for s in states))
    finally:
        if decoder is not None:
            decoder.mode = old


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe"])
@torch.inference_mode()
def test_transformers_path_estimate_matches_its_dynamic_cache(arch, tiny_tokenizer, monkeypatch):
    """DeepSeek-V3 (MLA) and GLM-4-MoE decode through transformers' modules and their DynamicCache, which for MLA
    holds the compressed latent (kv_lora_rank + qk_rope_head_dim per slot): the estimate, marked as one, is within
    10 % of the cache tensors after the target and the head have written every slot."""
    torch.manual_seed(0)
    model = build_family_policy(arch, SHAPE, tiny_tokenizer).eval()
    head = MTPHead.from_base(model).eval()
    made = []

    class Recorded(DynamicCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(forwards_module, "DynamicCache", Recorded)
    monkeypatch.setattr(mtp_module, "DynamicCache", Recorded)
    est = decode_bytes(model, head, B, SLOTS, GAMMA)
    assert est["path"] == "transformers" and est["estimate"]
    fw = forwards(model, head, B, SLOTS, gamma=GAMMA)
    ids, pos = prompt_inputs(model.config.vocab_size, B, SLOTS)
    valid = torch.ones((B, SLOTS), dtype=torch.bool)
    hid = fw.target(ids, pos, valid, 0)
    fw.drafter(ids, hid, pos, valid, 0)
    target, mcache = made

    def held(cache):
        return nbytes(*(t for layer in cache.layers for t in (layer.keys, layer.values)))

    cfg = model.config
    if arch == "deepseek_v3":
        assert est["target_kv"] == B * SLOTS * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert within(est["target_kv"], held(target))
    assert within(est["head_kv"], held(mcache))


def test_lean_weight_copies_count_until_built(tiny_tokenizer):
    """The lean path's transposed, fused weight copies are a fixed cost while not built, the size of the
    tensors the lean forwards then hold, and nothing once built."""
    model = build_tiny_policy(tiny_tokenizer)
    lean.forget(model)
    before = decode_bytes(model, None, 2, 16, 0)
    built = lean.lean_decoder(model)
    copies = sum(nbytes(layer.qkv, layer.o, layer.gate_up, layer.down) for layer in built.layers) + nbytes(built.lm_t)
    assert before["fixed"] == before["lean_weight_copies"] == copies
    after = decode_bytes(model, None, 2, 16, 0)
    assert after["fixed"] == 0 and after["total"] == before["total"] - copies


def test_estimate_is_linear_in_the_batch_and_grows_with_slots_and_gamma(policy):
    arch, model, head = policy
    one, many = decode_bytes(model, head, 1, SLOTS, GAMMA), decode_bytes(model, head, 7, SLOTS, GAMMA)
    assert many["total"] - many["fixed"] - many["draws"] == 7 * one["per_row"] and many["draws"] == 7 * one["draws"]
    assert decode_bytes(model, head, 1, 2 * SLOTS, GAMMA)["target_kv"] == 2 * one["target_kv"]
    assert decode_bytes(model, head, 1, SLOTS, 7)["transients"] > one["transients"]
    plain = decode_bytes(model, None, 1, SLOTS, 0)
    assert plain["head_kv"] == 0 and plain["per_row"] < one["per_row"]


def test_the_limit_refuses_a_batch_and_names_the_largest_that_fits(policy, monkeypatch):
    """With BEBOP_MEMORY_LIMIT set so that exactly 10 rows fit in 90 % of it, batch 64 is refused with one
    error naming the batch, the estimate, the limit and 10; batch 10 passes and batch 11 does not."""
    _, model, head = policy
    one = decode_bytes(model, head, 1, SLOTS, GAMMA, prompt_len=PROMPT)
    limit = int((one["fixed"] + 10.5 * (one["per_row"] + one["draws"])) / 0.9)   # draws: linear below their cap
    monkeypatch.setenv(LIMIT_ENV, str(limit))
    with pytest.raises(BebopError) as err:
        check_batch_fits(model, head, 64, SLOTS, GAMMA, prompt_len=PROMPT)
    msg = str(err.value)
    assert msg.startswith(f"a batch of 64 rows over {SLOTS} cache slots (gamma {GAMMA}) needs about "
                          f"{format_bytes(decode_bytes(model, head, 64, SLOTS, GAMMA, prompt_len=PROMPT)['total'])}")
    assert f"the {format_bytes(limit)} available on cpu ({LIMIT_ENV}={limit})" in msg
    assert msg.endswith("the largest batch that fits is 10")
    fits = check_batch_fits(model, head, 10, SLOTS, GAMMA, prompt_len=PROMPT)
    assert fits["largest_batch"] == 10 and fits["available"] == limit
    with pytest.raises(BebopError, match=r"largest batch that fits is 10$"):
        check_batch_fits(model, head, 11, SLOTS, GAMMA, prompt_len=PROMPT)
    monkeypatch.setenv(LIMIT_ENV, "1KiB")
    with pytest.raises(BebopError, match=r"not even one row fits"):
        check_batch_fits(model, head, 1, SLOTS, GAMMA)


def test_a_fitting_batch_passes_on_the_hosts_memory(tiny_model, monkeypatch):
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
    total = int(meminfo["MemTotal"].split()[0]) * 1024
    avail = available_bytes("cpu")
    assert 0 < avail <= total
    est = check_batch_fits(tiny_model, None, 4, 64, 0, prompt_len=8)
    assert est["largest_batch"] >= 4 and est["available_from"] == "MemAvailable in /proc/meminfo"


def test_draws_ahead_are_capped():
    """Random draws made ahead grow with the batch up to two chunks of 32 MiB, or two steps' when larger."""
    step = 4 * 4 * 152_000                                        # one row's [γ+1, V] noise, γ = 3
    assert draws_ahead(1, 3, 100) == 2 * 64 * 4 * 4 * 100         # 64 steps' worth for a small vocabulary
    assert draws_ahead(1, 3, 152_000) == draws_ahead(8, 3, 152_000) == 2 * (32 << 20)
    assert draws_ahead(512, 3, 152_000) == 2 * 512 * step         # one step is beyond 32 MiB


@pytest.mark.parametrize("text, value", [("4096", 4096), ("512MiB", 512 * 2**20), ("1.5 GiB", 3 * 2**29),
                                         ("2g", 2 * 2**30), ("64kb", 65536)])
def test_limit_values_parse(text, value, monkeypatch):
    assert parse_bytes(text) == value
    monkeypatch.setenv(LIMIT_ENV, text)
    assert available_bytes("cpu") == value


@pytest.mark.parametrize("text", ["lots", "-5GiB", "0", "12 parsecs", "1e9"])
def test_bad_limit_values_are_refused_naming_them(text, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, text)
    with pytest.raises(BebopError, match=rf"^{LIMIT_ENV}={re.escape(repr(text))} "):
        available_bytes("cpu")


@pytest.mark.parametrize("kwargs, bad", [({"batch": 0}, "batch"), ({"slots": -1}, "slots"),
                                         ({"gamma": 1.5}, "gamma"), ({"mode": "cached"}, "linear-state mode")])
def test_bad_arguments_are_refused(tiny_model, kwargs, bad):
    args = {"batch": 2, "slots": 16, "gamma": 1, "mode": None} | kwargs
    with pytest.raises(BebopError, match=bad):
        decode_bytes(tiny_model, None, **args)
