"""Exact laws, goodness-of-fit helpers and exactness checks shared by the tests of every sampling path and family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from bebop.core.sampling import probs_from_logits

P_FALSE_ALARM = 1e-4  # each chi-square test rejects a correct sampler with this probability


def prompts_for(tok, n):
    a, b = tok("Q: 1+2\n")["input_ids"], tok("Q: 12*3-4\n")["input_ids"]
    return [a if i % 2 == 0 else b for i in range(n)], (a, b)


def exact_logprobs(model, prompt, completion, params):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        p = probs_from_logits(model(ids).logits[0, len(prompt) - 1 : -1], params)
    return p.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).log()


def sequence_law(model, prompt, params, length):
    """Exact probability of every token sequence of ``length`` after ``prompt`` (V**length cells)."""
    V = model.config.vocab_size
    law = torch.ones(1)
    prefixes = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(length):
            p = probs_from_logits(model(prefixes).logits[:, -1], params)   # [n, V]
            law = (law[:, None] * p).reshape(-1)
            prefixes = torch.cat([prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(len(p))[:, None]], 1)
    return law.double().numpy()


def sequence_law_eos(model, prompt, params, length, eos_id, pad_id):
    """Exact probability of every ``length``-token output after ``prompt`` when decoding stops at ``eos_id``: a
    sequence whose token i is EOS has every later cell ``pad_id`` (as ``engine.decode.pack`` writes it), so those
    cells carry probability 1 on ``pad_id`` after an EOS. Codes as ``sequence_law`` (t_0·V^(length-1) + … + t_last).
    Unambiguous even when ``pad_id`` can be sampled: a cell after an EOS is always padding."""
    V = model.config.vocab_size
    law = torch.ones(1, dtype=torch.float64)
    prefixes = torch.tensor([prompt])
    ended = torch.zeros(1, dtype=torch.bool)
    pad = torch.nn.functional.one_hot(torch.tensor(pad_id), V).double()
    with torch.no_grad():
        for _ in range(length):
            p = probs_from_logits(model(prefixes).logits[:, -1], params).double()   # [n, V]
            p = torch.where(ended[:, None], pad, p)
            law = (law[:, None] * p).reshape(-1)
            nxt = torch.arange(V).repeat(len(p))
            ended = ended.repeat_interleave(V) | (nxt == eos_id)
            prefixes = torch.cat([prefixes.repeat_interleave(V, 0), nxt[:, None]], 1)
    return law.numpy()


def chisq_pvalue(observed_codes: np.ndarray, law: np.ndarray) -> float:
    """Chi-square goodness of fit; cells with expected count < 5 are merged into one (dropped when the law gives
    them no mass at all, and any draw there fails the test)."""
    n = len(observed_codes)
    counts = np.bincount(observed_codes, minlength=len(law)).astype(float)
    expected = law * n
    big = expected >= 5
    obs, exp = counts[big], expected[big]
    if not big.all():
        small_obs, small_exp = counts[~big].sum(), expected[~big].sum()
        if small_exp > 0:
            obs, exp = np.append(obs, small_obs), np.append(exp, small_exp)
        elif small_obs > 0:      # draws in cells of probability 0: impossible under the law
            return 0.0
    exp *= obs.sum() / exp.sum()
    return float(chisquare(obs, exp).pvalue)


def check_greedy_mtp_equals_plain(model, head, tokenizer, rule):
    """τ = 0: MTP decoding under ``rule`` emits plain greedy decoding's tokens exactly, on a varied greedy path with
    drafts both accepted and rejected (so the comparison is not vacuous)."""
    from bebop.core.sampling import SamplingParams
    from bebop.engine.decode import generate, generate_mtp

    prompts, _ = prompts_for(tokenizer, 4)
    params = SamplingParams(temperature=0.0)
    plain = generate(model, prompts, params, 30, eos_id=None)
    mtp = generate_mtp(model, head, prompts, params, 30, eos_id=None, gamma=3, rule=rule)
    assert torch.equal(plain.tokens, mtp.tokens)
    assert all(len(set(row)) >= 5 for row in plain.tokens.tolist())       # a varied greedy path, not one token
    assert 1.0 < mtp.metrics.accept_length < 4.0                          # drafts both accepted and rejected


def check_agent_rollouts_equal_reprefill(pairs, tokenizer, budget):
    """τ = 0 on the agent task: for each (model, head) of ``pairs``, native plain and native MTP rollouts equal the
    re-prefill reference (every round re-prefills each row's whole context) token for token; the first pair's
    model must call tools badly, so the environment is exercised."""
    from bebop.core.sampling import SamplingParams
    from bebop.tasks import sample_problems
    from bebop.tasks.agent import AgentTask
    from bebop.training.multiturn import rollout_multi_turn, rollout_multi_turn_reprefill

    task = AgentTask()
    problems = sample_problems(task, 6, 0)
    params = SamplingParams(temperature=0.0)
    for model, head in pairs:
        ref = rollout_multi_turn_reprefill(model, tokenizer, task, problems, params, budget, turn_tokens=16)
        plain = rollout_multi_turn(model, tokenizer, task, problems, params, budget, turn_tokens=16)
        mtp = rollout_multi_turn(model, tokenizer, task, problems, params, budget, turn_tokens=16, head=head)
        assert plain[0] == ref[0] and mtp[0] == ref[0]
        assert plain[2] == ref[2] == mtp[2]
        assert plain[1] == pytest.approx(ref[1], abs=1e-3) and mtp[1] == pytest.approx(ref[1], abs=1e-3)
    texts = rollout_multi_turn(pairs[0][0], tokenizer, task, problems, params, budget)[0]
    assert all(t.count("\nerror: bad json\n") >= 2 for t in texts)   # the environment was exercised
