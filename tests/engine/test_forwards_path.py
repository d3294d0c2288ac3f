"""Which forwards decode a model is said, once, and never silently downgraded: ``backend="lean"`` on a model the
lean path does not cover is an error; ``"auto"`` falls back to transformers' modules and says why."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bebop.core.sampling import SamplingParams
from bebop.engine.decode import generate, generate_mtp
from bebop.engine.forwards import decoding_path, forwards, report_paths
from bebop.errors import BebopError


@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      hidden_act="gelu")   # an MLP the lean path does not reproduce
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def said():
    lines: list[str] = []
    report_paths(lines.append)
    yield lines
    report_paths(None)


def _prompts(tok):
    return [tok("Q: 1+2\n")["input_ids"], tok("Q: 3*4+5\n")["input_ids"]]


def test_qwen3_decodes_on_the_lean_path(tiny_model):
    path = decoding_path(tiny_model)
    assert (path.backend, path.reason, path.model_type) == ("lean", "", "qwen3")
    assert path.line == "decoding with the lean path (Qwen3, float32 on cpu)"
    forced = decoding_path(tiny_model, backend="transformers")
    assert forced.backend == "transformers" and "backend 'transformers' asked for" in forced.line


def test_other_families_fall_back_under_auto_and_say_why(llama):
    path = decoding_path(llama)
    assert path.backend == "transformers"
    assert path.line == ("decoding with transformers' modules (model_type llama: layer 0 has hidden_act 'gelu' (the "
                         "lean MLP is SiLU-gated); float32 on cpu)")


def test_lean_asked_for_on_an_unsupported_model_is_an_error(llama, tiny_tokenizer):
    with pytest.raises(BebopError, match="backend 'lean' asked for, but model_type llama"):
        decoding_path(llama, backend="lean")
    with pytest.raises(BebopError, match="backend 'lean' asked for"):   # the engine refuses too, no fallback
        generate(llama, _prompts(tiny_tokenizer), SamplingParams(), 4, None, backend="lean")
    with pytest.raises(BebopError, match="unknown backend 'fast'"):
        forwards(llama, None, 1, 8, backend="fast")


def test_the_path_is_said_once_per_distinct_line(tiny_model, peaky, tiny_tokenizer, said):
    prompts, params = _prompts(tiny_tokenizer), SamplingParams()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        generate(tiny_model, prompts, params, 4, None, generator=gen)
    model, head = peaky
    generate_mtp(model, head, prompts, params, 4, None, gamma=2, generator=gen)
    generate(tiny_model, prompts, params, 4, None, generator=gen, backend="transformers")
    assert said == ["decoding with the lean path (Qwen3, float32 on cpu)",
                    "decoding with transformers' modules (backend 'transformers' asked for; float32 on cpu)"]
    report_paths(None)
    generate(tiny_model, prompts, params, 4, None, generator=gen, backend="transformers")
    assert len(said) == 2


def test_bfloat16_model_decodes_on_the_lean_path_with_float32_probabilities(tiny_model, tiny_tokenizer, said):
    model = type(tiny_model)(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    model = model.to(torch.bfloat16).eval()
    r = generate(model, _prompts(tiny_tokenizer), SamplingParams(), 6, None, generator=torch.Generator().manual_seed(0))
    assert said == ["decoding with the lean path (Qwen3, bfloat16 on cpu)"]
    assert r.logprobs.dtype is torch.float32 and torch.isfinite(r.logprobs).all()


def test_mtp_decoding_on_a_hybrid_model_through_transformers_is_refused(tiny_tokenizer, said):
    """A KV crop cannot undo a linear-attention state: MTP decoding on Qwen3.5 through transformers' modules is an
    error; plain decoding runs there, and MTP decoding runs on the hybrid path."""
    from bebop.models.families import build_family_policy
    from bebop.models.mtp import MTPHead
    from bebop.models.policy import ModelConfig

    torch.manual_seed(0)
    model = build_family_policy("qwen3_5", ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1,
                                                       intermediate_size=64), tiny_tokenizer).eval()
    head = MTPHead.from_base(model).eval()
    params = SamplingParams(temperature=1.0)
    with pytest.raises(BebopError, match="qwen3_5_text.*linear_attention.*backend 'auto'"):
        generate_mtp(model, head, [[1, 2, 3]], params, 4, eos_id=None, gamma=2, backend="transformers")
    assert generate(model, [[1, 2, 3]], params, 4, eos_id=None, backend="transformers").tokens.shape == (1, 4)
    assert generate_mtp(model, head, [[1, 2, 3]], params, 4, eos_id=None, gamma=2).tokens.shape == (1, 4)
    assert said[-1] == "decoding with the lean path (Qwen3.5 hybrid: 1 Gated DeltaNet + 1 attention layers, " \
                       "float32 on cpu)"


def test_a_completion_limit_beyond_the_context_is_refused_before_decoding(tiny_model, tiny_tokenizer):
    limit = tiny_model.config.max_position_embeddings
    prompts = _prompts(tiny_tokenizer)
    longest = max(map(len, prompts))
    with pytest.raises(BebopError, match=f"max_new_tokens {limit}.*context of {limit}.*at most {limit - longest}"):
        generate(tiny_model, prompts, SamplingParams(), limit, None)
    with pytest.raises(BebopError, match="max_new_tokens must be an integer >= 1, got 0"):
        generate(tiny_model, prompts, SamplingParams(), 0, None)
    assert generate(tiny_model, prompts, SamplingParams(), limit - longest, None).tokens.shape[1] <= limit - longest
