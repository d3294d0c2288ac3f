"""Measuring a head through the real engine: one decode call on a task batch (plain, MTP or multi-turn), and the
empirical per-step acceptance α_k, accept length and policy entropy over held-out prompts. Shared by the
benchmarks, the analyses and the demo, so every figure comes from the same decode path."""

from __future__ import annotations

import torch

from bebop.core.sampling import SamplingParams
from bebop.engine.decode import DecodeMetrics, Rollout
from bebop.engine.dispatch import DecodeConfig, Turns, decode
from bebop.errors import BebopError
from bebop.experimental.adaptive import AdaptiveDraft, as_policy
from bebop.tasks import get_task, sample_problems
from bebop.training.multiturn import is_multi_turn, task_env

__all__ = ["decode_task", "measure_acceptance"]


def decode_task(model, tokenizer, head, task_name: str, batch: tuple[list, list[list[int]]], params: SamplingParams,
                max_new_tokens: int, gamma, rule: str, generator: torch.Generator) -> tuple[Rollout, torch.Tensor]:
    """One engine call on ``batch`` (problems, prompt ids): plain (``head`` None) or MTP; multi-turn tasks (agent)
    run their episodes through ``turns.generate_turns`` with the task's environment. Returns the rollout and
    its mask of sampled tokens (environment tokens are not sampled; ``metrics.tokens`` counts sampled ones)."""
    problems, prompts = batch
    task = get_task(task_name)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    turns = None
    if is_multi_turn(task):
        if isinstance(gamma, AdaptiveDraft):
            raise BebopError(f"adaptive gamma is not supported for the multi-turn task {task_name!r} yet")
        turns = Turns(task_env(task, tokenizer, problems), tokenizer.convert_tokens_to_ids(task.terminator))
    g = gamma if turns is not None else as_policy(gamma, rule)
    r = decode(model, head, prompts, DecodeConfig(params, max_new_tokens, eos, g, rule, pad, generator), turns)
    return r, r.sampled_mask


@torch.inference_mode()
def measure_acceptance(model, tokenizer, head, task_name: str, rule: str, temperature: float, gamma: int,
                       n_prompts: int, batch_size: int, max_new_tokens: int, seed: int) -> dict:
    """Empirical per-step α_k and accept length of ``head`` through the real engine on held-out prompts, and the
    policy's mean per-token entropy H(p) (at τ) over the emitted tokens (the sampled ones: multi-turn tasks run
    real episodes, whose environment tokens are neither drafted nor counted)."""
    problems = sample_problems(get_task(task_name), n_prompts, seed)
    params = SamplingParams(temperature=temperature)
    total = DecodeMetrics()
    gen = torch.Generator(device=model.device).manual_seed(seed)
    ent_sum, n_tok = 0.0, 0
    for i in range(0, n_prompts, batch_size):
        chunk = problems[i : i + batch_size]
        batch = (chunk, [tokenizer(p.prompt)["input_ids"] for p in chunk])
        r, sampled = decode_task(model, tokenizer, head, task_name, batch, params, max_new_tokens, gamma, rule, gen)
        total.merge(r.metrics)
        ent_sum += float((r.entropy * sampled).sum())
        n_tok += int(sampled.sum())
    return {"alpha": total.alpha, "expected_alpha": total.expected_alpha, "accept_length": total.accept_length,
            "entropy": ent_sum / max(n_tok, 1)}
