"""The engine is exact on every decodable model family, on the path each family decodes through: Llama on the lean
path, DeepSeek-V3 (MLA + MoE) and GLM-4.5 (MoE) on transformers' modules — τ = 0 MTP decoding is plain greedy
decoding token for token, returned log-probs are a fresh full forward's, and MTP sequences have the plain
sampling law (χ², slow).

Two tiny models per family (2 layers, hidden 32, the tiny tokenizer's vocabulary, tied embeddings), each with
``MTPHead.from_base``:

* ``peaky``: the input embedding (and so the tied LM head) × 6, as ``tests/conftest.py``'s ``peaky`` — sharp
  logits, so 3-token sequences have few likely outcomes and the χ² test has power;
* ``lively``: the same, with every decoder-layer matrix × 10 as well. At initialisation scale the layers barely move
  the residual stream, so a random tied model's greedy path just repeats the prompt's last token and greedy MTP
  accepts every draft; the τ = 0 comparison would then prove nothing. The lively models' greedy paths vary and
  their drafts are both accepted and rejected (asserted).
"""

from __future__ import annotations

import pytest
import torch
from laws import P_FALSE_ALARM, check_greedy_mtp_equals_plain, chisq_pvalue, exact_logprobs, prompts_for, sequence_law

from bebop.core.sampling import SamplingParams
from bebop.engine.decode import generate_mtp
from bebop.engine.forwards import decoding_path
from bebop.models.mtp import MTPHead
from bebop.models.policy import ModelConfig, build_policy

FAMILIES = ["llama", "deepseek_v3", "glm4_moe"]
SHAPE = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
PATHS = {"llama": ("lean", ""), "deepseek_v3": ("transformers", "layer 0 is a DeepseekV3DecoderLayer"),
         "glm4_moe": ("transformers", "layer 0 is a Glm4MoeDecoderLayer")}


def family_policy(arch: str, tokenizer, layer_gain: float = 1.0, logit_scale: float = 6.0, seed: int = 1):
    """A tiny random ``arch`` policy with sharpened tied logits (and layer matrices × ``layer_gain``) + its head."""
    torch.manual_seed(seed)
    model = build_policy(SHAPE, tokenizer, arch=arch).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(logit_scale)
        for p in model.get_decoder().layers.parameters():
            if p.dim() >= 2:
                p.mul_(layer_gain)
    return arch, model, MTPHead.from_base(model).eval()


@pytest.fixture(scope="module", params=FAMILIES)
def peaky_family(request, tiny_tokenizer):
    return family_policy(request.param, tiny_tokenizer)


@pytest.fixture(scope="module", params=["qwen3", *FAMILIES])  # qwen3 too: the toy policy's greedy test, non-vacuous
def lively_family(request, tiny_tokenizer):
    return family_policy(request.param, tiny_tokenizer, layer_gain=10.0)


def test_each_family_decodes_on_its_path_and_the_head_with_it(peaky_family):
    arch, model, head = peaky_family
    backend, reason = PATHS[arch]
    path = decoding_path(model, head)
    assert path.backend == backend and reason in path.reason
    assert path.head_reason == ""                       # a lean target drafts with a lean head too
    if backend == "lean":
        assert path.line == "decoding with the lean path (Llama, float32 on cpu)"


@pytest.mark.parametrize("rule", ["greedy", "rejection", "target_only"])
def test_greedy_mtp_equals_plain_greedy_token_for_token(lively_family, tiny_tokenizer, rule):
    _, model, head = lively_family
    check_greedy_mtp_equals_plain(model, head, tiny_tokenizer, rule)


@pytest.mark.parametrize("rule", ["rejection", "target_only"])
def test_mtp_logprobs_match_a_full_forward(peaky_family, tiny_tokenizer, rule):
    """Several verify steps with ragged acceptance, cache holes and left padding: every returned log-prob equals a
    fresh full forward's."""
    _, model, head = peaky_family
    prompts, _ = prompts_for(tiny_tokenizer, 6)
    params = SamplingParams(temperature=1.0, top_k=20)
    r = generate_mtp(model, head, prompts, params, 24, eos_id=None, gamma=3, rule=rule,
                     generator=torch.Generator().manual_seed(0))
    assert (r.lengths == 24).all()
    assert r.metrics.accept_length > 1.0 and r.metrics.steps >= 6
    for b, comp in enumerate(r.completions()):
        torch.testing.assert_close(r.logprobs[b], exact_logprobs(model, prompts[b], comp, params), atol=2e-4, rtol=0)


@pytest.mark.slow
def test_mtp_sequences_have_the_plain_sampling_law(peaky_family, tiny_tokenizer):
    """10^5 sequences of 3 tokens from the MTP engine (γ = 2, RS at τ = 1) against their exact law under p."""
    _, model, head = peaky_family
    n, length = 100_000, 3
    prompts, (pa, pb) = prompts_for(tiny_tokenizer, n)
    params = SamplingParams(temperature=1.0)
    r = generate_mtp(model, head, prompts, params, length, eos_id=None, gamma=2, rule="rejection",
                     generator=torch.Generator().manual_seed(7))
    V = model.config.vocab_size
    codes = (r.tokens[:, 0] * V * V + r.tokens[:, 1] * V + r.tokens[:, 2]).numpy()
    for parity, prompt in ((0, pa), (1, pb)):
        law = sequence_law(model, prompt, params, length)
        assert chisq_pvalue(codes[parity::2], law) > P_FALSE_ALARM
