"""Task accuracy (sampled and greedy) and mean per-token policy entropy of a policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bebop.config import positive
from bebop.core.sampling import SamplingParams
from bebop.engine.decode import generate
from bebop.tasks import Task, get_task, sample_problems
from bebop.training.multiturn import is_multi_turn, rollout_multi_turn

EVAL_SEED = 10_000  # seed of the evaluation problem stream (SFT uses its own seed)


def rollout_rewards(model, tokenizer, task: Task, problems, params: SamplingParams, max_new_tokens: int,
                    batch_size: int, seed: int) -> tuple[list[float], float, int]:
    """Sample one completion per problem; returns rewards, summed token entropy and token count."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    rewards: list[float] = []
    ent_sum, n_tok = 0.0, 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        if is_multi_turn(task):  # tool use: the environment answers each call (bebop.training.multiturn)
            budget = max(max_new_tokens, getattr(task, "completion_tokens", 0))
            texts, ent, n = rollout_multi_turn(model, tokenizer, task, chunk, params, budget, gen)
            rewards += [task.reward(p, t) for p, t in zip(chunk, texts, strict=True)]
            ent_sum, n_tok = ent_sum + ent, n_tok + n
            continue
        prompts = [tokenizer(p.prompt)["input_ids"] for p in chunk]
        r = generate(model, prompts, params, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, gen)
        texts = tokenizer.batch_decode(r.completions(), skip_special_tokens=True)
        rewards += [task.reward(p, t) for p, t in zip(chunk, texts, strict=True)]
        ent_sum += float((r.entropy * r.mask).sum())
        n_tok += int(r.lengths.sum())
    return rewards, ent_sum, n_tok


@dataclass
class EvalConfig:
    """Options of ``bebop eval`` (and the defaults of :func:`evaluate`)."""

    task: str = "arith"
    samples: int = 256
    temperature: float = 1.0          # of ``accuracy``; ``greedy_accuracy`` is always τ = 0
    max_new_tokens: int = 96
    seed: int = EVAL_SEED

    def __post_init__(self) -> None:
        get_task(self.task)
        positive("samples", self.samples)
        positive("max_new_tokens", self.max_new_tokens)
        SamplingParams(temperature=self.temperature)


def evaluate(model, tokenizer, task: Task, samples: int = EvalConfig.samples,
             temperature: float = EvalConfig.temperature, max_new_tokens: int = EvalConfig.max_new_tokens,
             batch_size: int = 128, seed: int = EvalConfig.seed) -> dict:
    """``accuracy`` at ``temperature``, ``greedy_accuracy`` at τ = 0, and ``entropy``: mean per-token
    entropy H(p) (nats) of the policy at ``temperature`` over the sampled completions."""
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
