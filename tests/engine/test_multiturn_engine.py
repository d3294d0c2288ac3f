"""Native multi-turn rollouts (``bebop.engine.turns.generate_turns``): rows pause at the terminator, environment tokens
are prefilled into both caches, decoding resumes with MTP drafting. Checked against the exact law of the
transcripts, a fresh full forward, the re-prefill reference (``bebop.training.multiturn.rollout_multi_turn_reprefill``)
and single-row runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny_policy
from laws import P_FALSE_ALARM, check_agent_rollouts_equal_reprefill, chisq_pvalue, exact_logprobs, prompts_for

from bebop.core.sampling import SamplingParams, probs_from_logits
from bebop.engine.turns import generate_turns
from bebop.models.mtp import MTPHead
from bebop.tasks.agent import AgentTask

STOP = 7      # the toy environment's terminator: the peaky policy's most likely first token (p ≈ 0.25)
REPLY = [5, 6]  # what the toy environment appends after every terminator


def toy_env(row: int, transcript: list[int]) -> list[int]:
    assert transcript[-1] == STOP
    return REPLY


@pytest.fixture(scope="module")
def peaky(tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, seed=1, logit_scale=6.0)
    return model, MTPHead.from_base(model).eval()


def transcript_law(model, prompt, params, budget: int, threshold: float = 1e-5) -> dict[tuple, float]:
    """Exact probability of every transcript (model + environment tokens) under plain sampling with the toy
    environment and a budget of ``budget`` transcript tokens (a reply that reaches it is still appended),
    enumerated breadth first; transcripts below ``threshold`` are dropped (their mass is the remainder). The
    chi-square merges every cell with expected count < 5 anyway (probability < 2.5e-4 at 2·10⁴ draws), so
    dropping cells below 1e-5 does not change the statistic."""
    law: dict[tuple, float] = {}
    frontier: list[tuple[tuple, float]] = [((), 1.0)]
    while frontier:
        groups: dict[int, list[tuple[tuple, float]]] = {}
        for t, pr in frontier:
            groups.setdefault(len(t), []).append((t, pr))
        frontier = []
        for items in groups.values():
            for c in range(0, len(items), 8192):
                chunk = items[c : c + 8192]
                ctx = torch.tensor([prompt + list(t) for t, _ in chunk])
                with torch.no_grad():
                    p = probs_from_logits(model(ctx).logits[:, -1], params).double()
                p = p * torch.tensor([pr for _, pr in chunk], dtype=torch.float64)[:, None]
                for i, v in (p >= threshold).nonzero().tolist():
                    t, pr = chunk[i][0] + (v,), float(p[i, v])
                    if v == STOP:
                        t = t + tuple(REPLY)
                    if len(t) >= budget:
                        law[t] = pr
                    else:
                        frontier.append((t, pr))
    return law


def law_pvalue(completions: list[list[int]], law: dict[tuple, float]) -> float:
    keys = list(law)
    index = {k: i for i, k in enumerate(keys)}
    probs = np.array([law[k] for k in keys] + [max(0.0, 1.0 - sum(law.values()))])
    codes = np.array([index.get(tuple(c), len(keys)) for c in completions])
    return chisq_pvalue(codes, probs)


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "rule", "top_p"), [("none", "rejection", None), ("mtp", "rejection", None),
                                                         ("mtp", "target_only", 0.9)])
def test_native_multi_turn_transcripts_have_the_plain_sampling_law(peaky, tiny_tokenizer, strategy, rule, top_p):
    """2·10⁴ transcripts per prompt (budget 4 transcript tokens: 2-4 sampled, the toy environment inserting 2
    after every terminator) against their exact law; each chi-square test rejects a correct sampler with
    probability ``P_FALSE_ALARM`` = 1e-4 (6 tests here: family-wise ≤ 6e-4)."""
    model, head = peaky
    n, budget = 40_000, 4
    prompts, (pa, pb) = prompts_for(tiny_tokenizer, n)
    params = SamplingParams(temperature=1.0, top_p=top_p)
    r = generate_turns(model, head if strategy == "mtp" else None, prompts, params, budget, None, STOP, toy_env,
                       gamma=2, rule=rule, generator=torch.Generator().manual_seed(11))
    assert float((r.turns > 0).float().mean()) > 0.2          # the environment path is well exercised
    if strategy == "mtp":
        assert r.metrics.accept_length > 1.0
    comps = r.completions()
    for parity, prompt in ((0, pa), (1, pb)):
        law = transcript_law(model, prompt, params, budget)
        assert law_pvalue(comps[parity::2], law) > P_FALSE_ALARM


@pytest.mark.parametrize(("strategy", "lean"), [("none", True), ("rejection", True), ("target_only", True),
                                               ("none", False), ("rejection", False)])
def test_env_tokens_are_masked_and_model_logprobs_match_a_full_forward(peaky, tiny_tokenizer, strategy, lean):
    """Environment tokens: sampled = False, log-prob and entropy 0, not counted in metrics; every model token's
    log-prob and entropy equals a fresh full forward over prompt + transcript (holes, ragged replies, padding),
    through the lean forwards and through transformers' own (``backend="transformers"``)."""
    model, head = peaky
    prompts, _ = prompts_for(tiny_tokenizer, 36)
    params = SamplingParams(temperature=1.0, top_k=20)
    kinds = ([5, 6], [5], [], [6, 5, 6, 5, 6, 5, 6], [5, 6, 5], [6])
    replies = {row: kinds[row % 6] for row in range(len(prompts))}
    r = generate_turns(model, None if strategy == "none" else head, prompts, params, 40, None, STOP,
                       lambda row, t: replies[row], gamma=3, rule="rejection" if strategy == "none" else strategy,
                       generator=torch.Generator().manual_seed(0), backend="auto" if lean else "transformers")
    assert int(r.turns.sum()) >= 6 and len(set(r.turns.tolist())) > 1
    env_total = 0
    for b, comp in enumerate(r.completions()):
        smp = r.sampled[b, : len(comp)].tolist()
        expect, i = [], 0                                   # rebuild the sampled mask from the transcript
        while i < len(comp):
            expect.append(True)
            if comp[i] == STOP:
                k = min(len(replies[b]), len(comp) - i - 1)
                assert comp[i + 1 : i + 1 + k] == replies[b][:k]
                expect += [False] * k
                i += k
            i += 1
        assert smp == expect
        env_total += len(comp) - sum(smp)
        ids = torch.tensor([prompts[b] + comp])
        with torch.no_grad():
            p = probs_from_logits(model(ids).logits[0, len(prompts[b]) - 1 : -1], params)
        ref_logp = exact_logprobs(model, prompts[b], comp, params)
        ref_ent = torch.special.entr(p).sum(-1)
        m = torch.tensor(smp)
        torch.testing.assert_close(r.logprobs[b, : len(comp)][m], ref_logp[m], atol=2e-4, rtol=0)
        torch.testing.assert_close(r.entropy[b, : len(comp)][m], ref_ent[m], atol=2e-4, rtol=0)
        assert (r.logprobs[b, : len(comp)][~m] == 0).all() and (r.entropy[b, : len(comp)][~m] == 0).all()
        assert not r.sampled[b, len(comp):].any()
    assert env_total > 0
    assert r.metrics.tokens == int(r.sampled.sum()) == int(r.lengths.sum()) - env_total
    if strategy != "none":
        # acceptance counts come from verify steps only: every model token except each turn's first comes out of
        # a verify step, and a step yields at most accepted + 1 tokens; env tokens never enter either count
        first_tokens = len(prompts) + int(r.turns.sum())
        assert r.metrics.steps + r.metrics.accepted >= r.metrics.tokens - first_tokens
        assert r.metrics.accept_length > 1.0


@pytest.fixture(scope="module")
def tool_caller(tiny_tokenizer):
    """A tiny policy whose greedy continuation is the terminator ``}``: every turn is a (malformed) tool call,
    so greedy agent rollouts go through several environment replies before the environment ends them."""
    model = build_tiny_policy(tiny_tokenizer, seed=0)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[tiny_tokenizer.convert_tokens_to_ids("}")] = 1.03 * emb[tiny_tokenizer("\n", add_special_tokens=False)
                                                                      ["input_ids"][0]]
    return model, MTPHead.from_base(model).eval()


@pytest.mark.parametrize("budget", [100, 21])
def test_greedy_native_agent_rollout_equals_the_reprefill_reference(tool_caller, peaky, tiny_tokenizer, budget):
    """τ = 0 on the agent task: native plain and native MTP equal the re-prefill reference token for token."""
    check_agent_rollouts_equal_reprefill([tool_caller, peaky], tiny_tokenizer, budget)


@pytest.mark.parametrize("strategy", ["none", "greedy", "rejection"])
def test_rows_finish_independently(peaky, tiny_tokenizer, strategy):
    """One greedy batch whose rows end by ``max_turns``, environment ``None``, EOS, turn budget and transcript
    budget, at different times: each row's transcript is the one it gets decoded alone, and the expected one.
    The peaky policy's greedy continuation repeats the last token (checked first), so a reply ending with the
    terminator starts another turn, one ending with the EOS id makes the model emit EOS, and so on."""
    model, head = peaky
    tok = tiny_tokenizer
    prompts = [tok(s)["input_ids"] for s in ("Q: 1+2\n", "Q: 12*3-4\n", "Q: agent: cost of 3 apple\n", "Q: 7*7\n",
                                             "Q: 1+2\n")]
    params = SamplingParams(temperature=0.0)
    eos = 42
    replies = [[5, STOP], [6, STOP], [40, 41, eos], [30], [32] * 20]

    def env(row, transcript):
        return None if row == 1 and transcript.count(STOP) > 2 else replies[row]

    def run(ps, rows):
        return generate_turns(model, None if strategy == "none" else head, ps, params, 25, eos, STOP,
                              lambda i, t: env(rows[i], t), gamma=3, rule=strategy if strategy != "none" else "greedy",
                              turn_tokens=12, max_turns=3)

    batch = run(prompts, list(range(5)))
    expected = [
        [STOP, 5, STOP] * 3 + [STOP],           # max_turns: the 4th call is not made
        [STOP, 6, STOP, STOP],                  # the environment says done
        [STOP, 40, 41, eos, eos],               # EOS sampled after the reply
        [STOP, 30] + [30] * 12,                 # a turn of turn_tokens = 12 model tokens without a call
        [STOP] + [32] * 20 + [32] * 4,          # transcript budget 25
    ]
    assert batch.completions() == expected
    assert batch.turns.tolist() == [3, 1, 1, 1, 1]
    for b in range(5):
        alone = run([prompts[b]], [b])
        assert alone.completions() == [expected[b]]
        assert torch.equal(batch.sampled[b, : batch.lengths[b]], alone.sampled[0, : alone.lengths[0]])
        sampled = [True] + [False] * len(replies[b]) if b != 0 else [True, False, False] * 3 + [True]
        assert batch.sampled[b, : len(sampled)].tolist() == sampled
    assert batch.metrics.tokens == int(batch.sampled.sum()) == 4 + 2 + 2 + 13 + 5


def test_mtp_training_data_for_the_agent_task_holds_real_environment_replies(tool_caller, tiny_tokenizer):
    """train_mtp's policy samples on a multi-turn task are real episodes: the environment answered every call."""
    from bebop.training.samples import policy_samples

    rows = policy_samples(tool_caller[0], tiny_tokenizer, AgentTask(), 4, 0.0, 40, seed=0)
    for ids, n_prompt in rows:
        assert tiny_tokenizer.decode(ids[n_prompt:], skip_special_tokens=True).count("\nerror: bad json\n") >= 2
