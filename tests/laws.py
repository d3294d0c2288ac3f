"""Exact laws and goodness-of-fit helpers shared by the statistical (χ²) tests of every sampling path."""

from __future__ import annotations

import numpy as np
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
