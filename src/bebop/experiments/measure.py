"""Measuring a head through the real engine: one decode call on a task batch (plain, MTP or multi-turn), and the
empirical per-step acceptance α_k, accept length and policy entropy over held-out prompts. Shared by the
benchmarks, the analyses and the demo, so every figure comes from the same decode path."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from bebop.core.sampling import SamplingParams
from bebop.engine.decode import DecodeConfig, DecodeMetrics, Rollout
from bebop.engine.dispatch import Turns, decode
from bebop.errors import BebopError
from bebop.experimental.adaptive import AdaptiveDraft, as_policy
from bebop.tasks import get_task, sample_problems
from bebop.training.multiturn import is_multi_turn, task_env

__all__ = ["UNIT_KEYS", "Probe", "decode_config", "decode_task", "measure_acceptance"]

UNIT_KEYS = ("steps", "accepted", "reached", "accepted_k", "entropy_sum", "tokens")
"""Counters kept per unit (one prompt, from the engine's per-request counters ``DecodeMetrics.per_row``) so that
intervals can resample prompts: verify steps, accepted drafts, per draft step k the steps that reached it and
accepted it, and the summed policy entropy over the sampled tokens with their count. Every figure is a ratio of
their sums."""


def decode_config(tokenizer, params: SamplingParams, max_new_tokens: int, gamma=3, rule: str = "rejection",
                  generator: torch.Generator | None = None) -> DecodeConfig:
    """The engine's decode settings for ``tokenizer``'s EOS and padding tokens."""
    return DecodeConfig(params, max_new_tokens, tokenizer.eos_token_id, gamma, rule, tokenizer.pad_token_id,
                        generator)


def decode_task(model, tokenizer, head, task_name: str, batch: tuple[list, list[list[int]]],
                cfg: DecodeConfig) -> tuple[Rollout, torch.Tensor]:
    """One engine call on ``batch`` (problems, prompt ids): plain (``head`` None) or MTP; multi-turn tasks (agent)
    run their episodes with the task's environment. Returns the rollout and its mask of sampled tokens
    (environment tokens are not sampled; ``metrics.tokens`` counts sampled ones)."""
    problems, prompts = batch
    task = get_task(task_name)
    turns = None
    if is_multi_turn(task):
        if isinstance(cfg.gamma, AdaptiveDraft):
            raise BebopError(f"adaptive gamma is not supported for the multi-turn task {task_name!r} yet")
        turns = Turns(task_env(task, tokenizer, problems), tokenizer.convert_tokens_to_ids(task.terminator))
    elif head is not None:
        cfg = replace(cfg, gamma=as_policy(cfg.gamma, cfg.rule))  # rule auto at a fixed γ needs a drafting policy
    r = decode(model, head, prompts, cfg, turns)
    return r, r.sampled_mask


@dataclass(frozen=True)
class Probe:
    """One acceptance measurement: ``prompts`` held-out problems of ``task`` (drawn with ``seed``), decoded in
    batches of ``batch_size`` under ``rule`` at temperature τ and draft length γ."""

    task: str
    rule: str
    temperature: float
    gamma: int
    prompts: int
    batch_size: int = 32
    max_new_tokens: int = 64
    seed: int = 0


@torch.inference_mode()
def measure_acceptance(model, tokenizer, head, probe: Probe) -> dict:
    """Empirical per-step α_k and accept length of ``head`` through the real engine on held-out prompts, and the
    policy's mean per-token entropy H(p) (at τ) over the emitted tokens (the sampled ones: multi-turn tasks run
    real episodes, whose environment tokens are neither drafted nor counted). ``units`` holds the counters of
    :data:`UNIT_KEYS` per prompt, in prompt order (lists, JSON-able): accept length = 1 + Σ accepted / Σ steps,
    α_k = Σ accepted_k / Σ reached over the prompts, so a bootstrap over prompts recomputes every figure; prompts
    are decoded ``batch_size`` per engine call (the units do not depend on it)."""
    problems = sample_problems(get_task(probe.task), probe.prompts, probe.seed)
    gen = torch.Generator(device=model.device).manual_seed(probe.seed)
    cfg = decode_config(tokenizer, SamplingParams(temperature=probe.temperature), probe.max_new_tokens, probe.gamma,
                        probe.rule, gen)
    total = DecodeMetrics()
    units: dict[str, list] = {k: [] for k in UNIT_KEYS}
    for i in range(0, probe.prompts, probe.batch_size):
        chunk = problems[i : i + probe.batch_size]
        batch = (chunk, [tokenizer(p.prompt)["input_ids"] for p in chunk])
        r, sampled = decode_task(model, tokenizer, head, probe.task, batch, cfg)
        total.merge(r.metrics)
        rows = r.metrics.per_row
        ent, tok = torch.stack([(r.entropy * sampled).sum(1), sampled.sum(1).to(r.entropy.dtype)]).tolist()
        for key, val in zip(UNIT_KEYS, (rows["steps"], rows["accepted"], rows["reached"], rows["accepted_k"], ent,
                                        [int(t) for t in tok]), strict=True):
            units[key] += val
    n_tok = sum(units["tokens"])
    return {"alpha": total.alpha, "expected_alpha": total.expected_alpha, "accept_length": total.accept_length,
            "entropy": sum(units["entropy_sum"]) / max(n_tok, 1), "units": units}
