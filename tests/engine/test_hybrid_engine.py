"""The engine is exact on hybrid linear-attention models (Qwen3.5, Qwen3-Next), whose Gated DeltaNet state is rolled
back per row after every verify (``bebop.models.hybrid``, ``Forwards.keep``): τ = 0 MTP decoding is plain greedy
decoding token for token; returned log-probs are a fresh full forward's, with rejections, left padding and both
linear-state modes; multi-turn rollouts (environment replies prefilled, rows compacted) and adaptive γ keep both
properties; a head the hybrid path cannot run and γ > GAMMA_MAX are refused; and MTP sequences have the plain
sampling law with EOS and ragged prompts (χ², slow) — a χ² test that a deliberately broken rollback fails.

Models: tiny random hybrids (``families.build_family_policy``) with sharpened tied logits (embedding × 6, as
``test_families_engine``) and every decoder-layer matrix × ``layer_gain``, plus ``MTPHead.from_base`` (the last
full-attention layer as its block). ``lively`` (4 layers: 3 Gated DeltaNet + 1 attention, gain 5): a varied
greedy path whose drafts are both accepted and rejected (asserted)."""

from __future__ import annotations

import pytest
import torch
from laws import (
    P_FALSE_ALARM,
    check_agent_rollouts_equal_reprefill,
    check_greedy_mtp_equals_plain,
    chisq_pvalue,
    exact_logprobs,
    prompts_for,
    sequence_law_eos,
)

import bebop.models.hybrid as hybrid_module
from bebop.core.sampling import SamplingParams, probs_from_logits
from bebop.engine.decode import generate, generate_mtp
from bebop.engine.forwards import decoding_path
from bebop.engine.turns import generate_turns
from bebop.errors import BebopError
from bebop.experimental.adaptive import AdaptiveDraft
from bebop.models.families import build_family_policy
from bebop.models.hybrid import GAMMA_MAX, MODES, HybridCache, LinearState, hybrid_decoder
from bebop.models.mtp import MTPHead
from bebop.models.policy import ModelConfig

HYBRIDS = ["qwen3_5", "qwen3_next"]
SHAPE = ModelConfig(num_layers=4, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
FAMILY = {"qwen3_5": "Qwen3.5", "qwen3_next": "Qwen3-Next"}


def hybrid_policy(arch: str, tokenizer, layer_gain: float = 5.0, logit_scale: float = 6.0, seed: int = 2,
                  shape: ModelConfig = SHAPE, linear_gain: float = 1.0):
    """A tiny random hybrid ``arch`` with sharpened tied logits, decoder-layer matrices × ``layer_gain`` (the
    Gated DeltaNet matrices × ``linear_gain`` more), and its warm-started head."""
    torch.manual_seed(seed)
    model = build_family_policy(arch, shape, tokenizer).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(logit_scale)
        for name, p in model.get_decoder().layers.named_parameters():
            if p.dim() >= 2:
                p.mul_(layer_gain * (linear_gain if ".linear_attn." in f".{name}" else 1.0))
    return model, MTPHead.from_base(model).eval()


@pytest.fixture(scope="module", params=HYBRIDS)
def lively(request, tiny_tokenizer):
    return hybrid_policy(request.param, tiny_tokenizer)


@pytest.fixture(params=MODES)
def mode(request, lively, monkeypatch):
    """The engine's linear-state mode for ``lively`` (its caches take ``HybridDecoder.mode``), restored after; and
    a check that the mode really ran: ``select_state`` (the recompute rollback) runs in recompute mode only."""
    calls = []
    real = hybrid_module.select_state

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(hybrid_decoder(lively[0]), "mode", request.param)
    monkeypatch.setattr(hybrid_module, "select_state", counted)
    yield request.param
    assert bool(calls) == (request.param == "recompute")


def test_a_hybrid_and_its_head_decode_on_the_hybrid_path(lively):
    model, head = lively
    path = decoding_path(model, head)
    arch = model.config.model_type.removesuffix("_text")
    assert path.backend == "lean" and path.head_reason == ""
    assert path.family == f"{FAMILY[arch]} hybrid: 3 Gated DeltaNet + 1 attention layers"


@pytest.mark.parametrize("rule", ["greedy", "rejection", "target_only"])
def test_greedy_mtp_equals_plain_greedy_token_for_token(lively, tiny_tokenizer, rule):
    check_greedy_mtp_equals_plain(*lively, tiny_tokenizer, rule)


@pytest.mark.parametrize("rule", ["rejection", "target_only"])
def test_mtp_logprobs_match_a_full_forward(lively, mode, tiny_tokenizer, rule):
    """Several verify steps with ragged acceptance (a row's linear state rolled back to its own cut), left padding
    (two prompt lengths), in both linear-state modes: every returned log-prob equals a fresh full forward's."""
    model, head = lively
    prompts, _ = prompts_for(tiny_tokenizer, 6)
    params = SamplingParams(temperature=1.0, top_k=20)
    r = generate_mtp(model, head, prompts, params, 24, eos_id=None, gamma=3, rule=rule,
                     generator=torch.Generator().manual_seed(0))
    assert (r.lengths == 24).all()
    assert 1.0 < r.metrics.accept_length < 4.0 and r.metrics.steps >= 6 * 6
    for b, comp in enumerate(r.completions()):
        torch.testing.assert_close(r.logprobs[b], exact_logprobs(model, prompts[b], comp, params), atol=2e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- multi-turn

STOP = 7      # the toy environment's terminator ("\n"): one of the lively hybrids' likelier tokens


@pytest.fixture
def compactions(monkeypatch):
    """Counts ``HybridCache.select`` calls (a multi-turn batch compacted to the rows that resume)."""
    calls = []
    real = HybridCache.select

    def counted(self, rows):
        calls.append(len(rows))
        return real(self, rows)

    monkeypatch.setattr(HybridCache, "select", counted)
    return calls


@pytest.mark.parametrize("strategy", ["none", "rejection", "target_only"])
def test_multi_turn_logprobs_match_a_full_forward(lively, mode, compactions, tiny_tokenizer, strategy):
    """Ragged environment replies (0 to 7 tokens) prefilled in one batched forward each (``keep(m)``: each row's
    linear state after its own last reply token), batches compacted when rows end: every model token's log-prob
    and entropy equals a fresh full forward over prompt + transcript, environment tokens are masked."""
    model, head = lively
    prompts, _ = prompts_for(tiny_tokenizer, 24)
    params = SamplingParams(temperature=1.0, top_k=20)
    kinds = ([5, 6], [5], [], [6, 5, 6, 5, 6, 5, 6], [5, 6, 5], [6])
    replies = {row: kinds[row % 6] for row in range(len(prompts))}
    r = generate_turns(model, None if strategy == "none" else head, prompts, params, 40, None, STOP,
                       lambda row, t: replies[row], gamma=3, rule="rejection" if strategy == "none" else strategy,
                       generator=torch.Generator().manual_seed(0))
    assert int(r.turns.sum()) >= 6 and len(set(r.turns.tolist())) > 1
    assert compactions and min(compactions) < len(prompts)               # rows left the batch
    if strategy != "none":
        assert 1.0 < r.metrics.accept_length < 4.0
    env_total = 0
    for b, comp in enumerate(r.completions()):
        m = r.sampled[b, : len(comp)]
        env_total += int((~m).sum())
        ids = torch.tensor([prompts[b] + comp])
        with torch.no_grad():
            p = probs_from_logits(model(ids).logits[0, len(prompts[b]) - 1 : -1], params)
        torch.testing.assert_close(r.logprobs[b, : len(comp)][m], exact_logprobs(model, prompts[b], comp, params)[m],
                                   atol=2e-4, rtol=0)
        torch.testing.assert_close(r.entropy[b, : len(comp)][m], torch.special.entr(p).sum(-1)[m], atol=2e-4, rtol=0)
        assert (r.logprobs[b, : len(comp)][~m] == 0).all()
    assert env_total > 0


@pytest.fixture(scope="module")
def tool_caller(lively, tiny_tokenizer):
    """A hybrid of ``lively``'s family whose greedy continuation is the agent task's terminator ``}`` (its embedding
    1.03 × that of the token its greedy path repeats, ``\\n``): every turn is a (malformed) tool call, so greedy
    agent rollouts go through several environment replies."""
    arch = lively[0].config.model_type.removesuffix("_text")
    model, _ = hybrid_policy(arch, tiny_tokenizer, layer_gain=1.0, logit_scale=1.0, seed=0)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[tiny_tokenizer.convert_tokens_to_ids("}")] = 1.03 * emb[tiny_tokenizer("\n", add_special_tokens=False)
                                                                      ["input_ids"][0]]
    return model, MTPHead.from_base(model).eval()


@pytest.mark.parametrize("budget", [100, 21])
def test_greedy_native_agent_rollout_equals_the_reprefill_reference(tool_caller, lively, tiny_tokenizer, budget):
    """τ = 0 on the agent task: native plain and native MTP rollouts on a hybrid equal the re-prefill reference
    (``rollout_multi_turn_reprefill``: every round re-prefills each row's whole context) token for token."""
    check_agent_rollouts_equal_reprefill([tool_caller, lively], tiny_tokenizer, budget)


# ---------------------------------------------------------------------------------------------- adaptive γ


def forcing() -> AdaptiveDraft:
    """As ``tests/experimental/test_adaptive.py``: starts at γ = 3 and, learning fast, moves γ per step."""
    return AdaptiveDraft([1.0, 1.3, 1.6], prior=0.9, prior_weight=1.0)


def test_adaptive_greedy_equals_plain_greedy(lively, tiny_tokenizer):
    model, head = lively
    prompts, _ = prompts_for(tiny_tokenizer, 4)
    params = SamplingParams(temperature=0.0)
    plain = generate(model, prompts, params, 30, eos_id=None)
    mtp = generate_mtp(model, head, prompts, params, 30, eos_id=None, gamma=forcing(), rule="auto")
    assert torch.equal(plain.tokens, mtp.tokens)
    assert 1.0 < mtp.metrics.mean_gamma < 3.0                             # γ really varied


@pytest.mark.parametrize("rule", ["rejection", "auto"])
def test_adaptive_logprobs_match_a_full_forward(lively, mode, tiny_tokenizer, rule):
    """Verifies of varying length (γ re-planned after every draft; rule auto: RS or TO per row): the rollback
    cut comes from a verify of that step's own length."""
    model, head = lively
    prompts, _ = prompts_for(tiny_tokenizer, 6)
    params = SamplingParams(temperature=1.0, top_k=20)
    r = generate_mtp(model, head, prompts, params, 24, eos_id=None, gamma=forcing(), rule=rule,
                     generator=torch.Generator().manual_seed(0))
    assert (r.lengths == 24).all() and 1.0 < r.metrics.mean_gamma < 3.0
    for b, comp in enumerate(r.completions()):
        torch.testing.assert_close(r.logprobs[b], exact_logprobs(model, prompts[b], comp, params), atol=2e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("other", ["qwen3", "llama", "deepseek_v3"])
def test_a_head_of_another_family_is_refused_on_a_hybrid(lively, tiny_tokenizer, other):
    """A head whose block is not a full-attention layer of a hybrid family, bound to a hybrid model (same hidden
    size and vocabulary, so ``bind`` takes it): transformers' modules cannot run it with the hybrid's (partial)
    rotary embedding, so it is refused up front, naming its block and the model's family."""
    model, _ = lively
    torch.manual_seed(0)
    head = MTPHead.from_base(build_family_policy(other, SHAPE, tiny_tokenizer).eval()).eval()
    head.bind(model)
    block = type(head.layers[0].mtp_block).__name__
    pattern = f"cannot draft for this hybrid model: its layer 0's block is a {block}.*{model.config.model_type}"
    with pytest.raises(BebopError, match=pattern):
        decoding_path(model, head)
    with pytest.raises(BebopError, match=pattern):
        generate_mtp(model, head, [[1, 2, 3]], SamplingParams(temperature=1.0), 4, eos_id=None, gamma=2)


def test_a_head_of_the_other_hybrid_family_drafts_on_the_hybrid_path(tiny_tokenizer):
    """A Qwen3-Next head on a Qwen3.5 model: the same gated attention, run by the hybrid path; decoding is exact."""
    model, _ = hybrid_policy("qwen3_5", tiny_tokenizer)
    _, head = hybrid_policy("qwen3_next", tiny_tokenizer)
    head.bind(model)
    assert decoding_path(model, head).head_reason == ""
    prompts, _ = prompts_for(tiny_tokenizer, 2)
    params = SamplingParams(temperature=1.0)
    r = generate_mtp(model, head, prompts, params, 8, eos_id=None, gamma=2, generator=torch.Generator().manual_seed(0))
    for b, comp in enumerate(r.completions()):
        torch.testing.assert_close(r.logprobs[b], exact_logprobs(model, prompts[b], comp, params), atol=2e-4, rtol=0)


def test_gamma_above_the_hybrid_maximum_is_refused(lively):
    model, head = lively
    assert GAMMA_MAX == 16
    params = SamplingParams(temperature=1.0)
    with pytest.raises(BebopError, match="gamma 17 is larger than the maximum draft length .*hybrid.* \\(16"):
        generate_mtp(model, head, [[1, 2, 3]], params, 4, eos_id=None, gamma=17)
    with pytest.raises(BebopError, match="gamma 17 .*\\(16"):
        generate_turns(model, head, [[1, 2, 3]], params, 4, None, STOP, lambda row, t: [5], gamma=17)
    assert generate_mtp(model, head, [[1, 2, 3]], params, 4, eos_id=None, gamma=16).tokens.shape == (1, 4)


# ---------------------------------------------------------------------------------------------- the law (slow)

SLOW_SHAPE = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=1, intermediate_size=64)
EOS = 7       # the slow model's likeliest first token: rows end at token 1, 2 or 3


@pytest.fixture(scope="module")
def law_model(tiny_tokenizer):
    """A 2-layer Qwen3.5 (1 Gated DeltaNet + 1 attention layer, linear head dims 8 so 10^5 rows decode in ~30 s on a
    core) whose Gated DeltaNet matrices are × 5: its linear state moves p by a TV of ~0.2, so a rollback that keeps
    rejected drafts in it changes the law visibly (``test_a_broken_rollback_fails_the_law_test``)."""
    return hybrid_policy("qwen3_5", tiny_tokenizer, layer_gain=1.0, seed=1, shape=SLOW_SHAPE, linear_gain=5.0)


def law_pvalues(model, head, tokenizer, params, rule, n: int = 100_000):
    """``n`` rows of 3 tokens (γ = 3, EOS, two prompt lengths alternating, decoded in chunks of 25,000), tested per
    prompt against their exact law with EOS (``sequence_law_eos``): the two p-values."""
    length, chunk = 3, 25_000
    prompts, (pa, pb) = prompts_for(tokenizer, n)
    g = torch.Generator().manual_seed(7)
    rows = [generate_mtp(model, head, prompts[c : c + chunk], params, length, eos_id=EOS, gamma=3, rule=rule,
                         generator=g) for c in range(0, n, chunk)]
    tokens = torch.cat([r.tokens for r in rows])
    ends = torch.bincount(torch.cat([r.lengths for r in rows]), minlength=4)[1:]
    assert (ends > n // 200).all()                               # rows end at every step: after 1, 2 and 3 tokens
    assert all(1.0 < r.metrics.accept_length < 4.0 for r in rows)
    V = model.config.vocab_size
    codes = (tokens[:, 0] * V * V + tokens[:, 1] * V + tokens[:, 2]).numpy()
    pvalues = []
    for parity, prompt in ((0, pa), (1, pb)):
        law = sequence_law_eos(model, prompt, params, length, EOS, 0)
        assert abs(law.sum() - 1) < 1e-6
        pvalues.append(chisq_pvalue(codes[parity::2], law))
    return pvalues


RS = (SamplingParams(temperature=0.7, top_p=0.9), "rejection")
TO = (SamplingParams(temperature=1.0), "target_only")


@pytest.mark.slow
@pytest.mark.parametrize(("params", "rule"), [RS, TO], ids=["rs-t0.7-top_p0.9", "to-t1"])
def test_mtp_sequences_have_the_plain_sampling_law(law_model, tiny_tokenizer, params, rule):
    """RS at τ = 0.7 with top-p 0.9 and TO at τ = 1, γ = 3: 10^5 sequences (cut after EOS) against their exact
    law under p; each χ² test rejects a correct sampler with probability ``P_FALSE_ALARM`` per prompt."""
    model, head = law_model
    pvalues = law_pvalues(model, head, tiny_tokenizer, params, rule)
    assert all(p > P_FALSE_ALARM for p in pvalues), pvalues


@pytest.mark.slow
def test_a_broken_rollback_fails_the_law_test(law_model, tiny_tokenizer, monkeypatch):
    """The χ² test above has power: with every row keeping the linear state after all γ+1 verified positions
    (rejected drafts folded in), the RS sequences fail it — already at a fifth of its rows."""
    model, head = law_model
    keep = LinearState.keep

    def keep_everything(self, last):
        keep(self, torch.full_like(last, self.full.shape[-1] - self.conv.shape[-1] - 1))

    monkeypatch.setattr(LinearState, "keep", keep_everything)
    pvalues = law_pvalues(model, head, tiny_tokenizer, *RS, n=20_000)
    assert all(p < P_FALSE_ALARM for p in pvalues), pvalues
