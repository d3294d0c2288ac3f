"""The head's training data (DESIGN §4): the policy's own samples at the rollout temperature and length, drawn
in batches from a task's prompts."""

from __future__ import annotations

import torch

from bebop.core.sampling import SamplingParams
from bebop.engine.dispatch import DecodeConfig, Turns, decode
from bebop.tasks import get_task, sample_problems
from bebop.training.multiturn import is_multi_turn, task_env

HELDOUT_SEED_OFFSET = 1_000_003  # the held-out samples' seed is the run's seed plus this


def policy_samples(model, tokenizer, task, n: int, temperature: float, max_new_tokens: int, seed: int,
                   batch_size: int = 128) -> list[tuple[list[int], int]]:
    """``n`` sequences (prompt ids + sampled completion ids) from the policy, with their prompt lengths.
    Multi-turn tasks (agent) run real episodes, so the completions hold the environment's replies (as
    context the head drafts after, exactly as in rollouts) instead of replies the policy made up."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = []
    problems = sample_problems(task, n, seed)
    params = SamplingParams(temperature=temperature)
    for i in range(0, n, batch_size):
        chunk = problems[i : i + batch_size]
        prompts = [tokenizer(p.prompt)["input_ids"] for p in chunk]
        turns = Turns(task_env(task, tokenizer, chunk), tokenizer.convert_tokens_to_ids(task.terminator)) \
            if is_multi_turn(task) else None
        r = decode(model, None, prompts, DecodeConfig(params, max_new_tokens, tokenizer.eos_token_id,
                                                      pad_id=tokenizer.pad_token_id, generator=gen), turns)
        out += [(pr + c, len(pr)) for pr, c in zip(prompts, r.completions(), strict=True)]
    return out


def usable(rows: list[tuple[list[int], int]], gamma: int) -> list[tuple[list[int], int]]:
    """Sequences with at least one trainable position: ≥ γ + 1 completion tokens."""
    return [(ids, n) for ids, n in rows if len(ids) - n >= gamma + 1]


def training_rows(cfg, model, tokenizer) -> tuple[list[tuple[list[int], int]], list[tuple[list[int], int]]]:
    """``(data, heldout)`` for a head-training run ``cfg`` (a ``TrainMTPConfig``): ``cfg.data_samples`` and
    ``cfg.heldout_samples`` policy samples, keeping those with ≥ ``gamma_train`` + 1 completion tokens."""
    task = get_task(cfg.source.task)
    data = policy_samples(model, tokenizer, task, cfg.data_samples, cfg.temperature, cfg.max_new_tokens, cfg.seed)
    heldout = policy_samples(model, tokenizer, task, cfg.heldout_samples, cfg.temperature, cfg.max_new_tokens,
                             cfg.seed + HELDOUT_SEED_OFFSET)
    return usable(data, cfg.gamma_train), usable(heldout, cfg.gamma_train)
