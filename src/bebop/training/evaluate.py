"""Task accuracy (sampled and greedy) and mean per-token policy entropy of a policy."""

from __future__ import annotations

import torch

from bebop.core.sampling import SamplingParams
from bebop.engine.dispatch import DecodeConfig, Turns, decode
from bebop.tasks import Task, completion_budget, sample_problems
from bebop.training.multiturn import is_multi_turn, task_env
from bebop.training.options import EvalConfig


def rollout_rewards(model, tokenizer, task: Task, problems, params: SamplingParams, max_new_tokens: int,
                    batch_size: int, seed: int) -> tuple[list[float], float, int]:
    """Sample one completion per problem; returns rewards, summed token entropy and token count."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    rewards: list[float] = []
    ent_sum, n_tok = 0.0, 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        prompts = [tokenizer(p.prompt)["input_ids"] for p in chunk]
        multi = is_multi_turn(task)  # tool use: the environment answers each call (bebop.training.multiturn)
        turns = Turns(task_env(task, tokenizer, chunk), tokenizer.convert_tokens_to_ids(task.terminator),
                      turn_tokens=32) if multi else None
        budget = max(max_new_tokens, getattr(task, "completion_tokens", 0)) if multi else max_new_tokens
        r = decode(model, None, prompts, DecodeConfig(params, budget, tokenizer.eos_token_id,
                                                      pad_id=tokenizer.pad_token_id, generator=gen), turns)
        texts = tokenizer.batch_decode(r.completions(), skip_special_tokens=True)
        rewards += [task.reward(p, t) for p, t in zip(chunk, texts, strict=True)]
        ent_sum += float((r.entropy * r.sampled_mask).sum())
        n_tok += int(r.sampled_mask.sum())
    return rewards, ent_sum, n_tok


def evaluate(model, tokenizer, task: Task, samples: int = EvalConfig.samples,
             temperature: float = EvalConfig.temperature, max_new_tokens: int | None = None,
             batch_size: int = 128, seed: int = EvalConfig.seed) -> dict:
    """``accuracy`` at ``temperature``, ``greedy_accuracy`` at τ = 0, and ``entropy``: mean per-token
    entropy H(p) (nats) of the policy at ``temperature`` over the sampled completions; ``max_new_tokens`` None is
    the task's completion budget."""
    max_new_tokens = completion_budget(task) if max_new_tokens is None else max_new_tokens
    problems = sample_problems(task, samples, seed)
    rewards, ent_sum, n_tok = rollout_rewards(
        model, tokenizer, task, problems, SamplingParams(temperature=temperature), max_new_tokens, batch_size, seed
    )
    greedy, _, _ = rollout_rewards(
        model, tokenizer, task, problems, SamplingParams(temperature=0.0), max_new_tokens, batch_size, seed
    )
    return {
        "task": task.name, "samples": samples, "temperature": temperature,
        "accuracy": sum(r >= 1.0 for r in rewards) / samples,
        "greedy_accuracy": sum(r >= 1.0 for r in greedy) / samples,
        "entropy": ent_sum / max(1, n_tok), "mean_tokens": n_tok / samples,
    }
