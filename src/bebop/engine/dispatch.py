"""One entry point for every kind of decoding: plain, MTP speculative, or multi-turn with an environment.

``decode`` picks from its arguments: with ``slots`` it runs ``continuous.continuous_decode`` (continuous batching, any
of the kinds below); with ``turns`` (an environment callback) ``turns.turns_decode``; otherwise with a head
``decode.mtp_decode``; otherwise ``decode.generate``. Callers that only switch between these (evaluation, policy
samples for head training, RL rollouts, benchmarks) need not know which one runs.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from bebop.engine.continuous import continuous_decode
from bebop.engine.decode import DecodeConfig, Rollout, generate, mtp_decode
from bebop.engine.forwards import check_context
from bebop.engine.memory import check_batch_fits
from bebop.engine.slots import COMPACT_MIN, COMPACT_WASTE
from bebop.engine.turns import Turns, turns_decode

__all__ = ["DecodeConfig", "Turns", "check_memory", "decode", "decode_slots"]


def decode(model: PreTrainedModel, head, prompts: list[list[int]], cfg: DecodeConfig,
           turns: Turns | None = None, slots: int | None = None) -> Rollout:
    """Decode ``prompts``: multi-turn when ``turns`` is given (plain or MTP by ``head``), else MTP speculative
    sampling with ``head`` (DESIGN §3), else plain sampling; with ``slots``, through continuous batching with at most
    that many rows in flight (a static batch of all prompts otherwise). ``Rollout.sampled_mask`` marks the model's
    tokens in every case (environment tokens are not sampled)."""
    check_memory(model, head, prompts, cfg, turns, slots)
    if slots is not None:
        return continuous_decode(model, head, prompts, cfg, slots, turns)
    if turns is not None:
        return turns_decode(model, head, prompts, cfg, turns)
    if head is not None:
        return mtp_decode(model, head, prompts, cfg)
    return generate(model, prompts, cfg.params, cfg.max_new_tokens, cfg.eos_id, cfg.pad_id, cfg.generator,
                    cfg.backend)


def decode_slots(prompt_len: int, cfg: DecodeConfig, gamma: int, turns: Turns | None, slots: int | None) -> int:
    """The cache columns a decoding call may use: the prompt plus one per token for plain decoding, γ+1 per verify
    for MTP decoding (rejected drafts stay holes), and, with continuous batching, the longest row plus the holes
    compaction lets pass (``slots.COMPACT_WASTE``, at least ``COMPACT_MIN``)."""
    n = cfg.max_new_tokens
    if slots is not None:
        row = prompt_len + n + gamma + 1
        return row + max(COMPACT_MIN, int(COMPACT_WASTE * row) + 1)
    if turns is not None:
        return prompt_len + (2 if gamma else 1) * (n + gamma + 1)
    return prompt_len + (n + 1) * (gamma + 1) if gamma else prompt_len + n


def check_memory(model: PreTrainedModel, head, prompts: list[list[int]], cfg: DecodeConfig, turns: Turns | None = None,
                 slots: int | None = None) -> dict:
    """One clear error before any decoding when the call's batch does not fit in the device's memory
    (``engine.memory.check_batch_fits``: the estimate, what is available and the largest batch that fits)."""
    check_context(model, prompts, cfg.max_new_tokens)
    gamma = 0
    if head is not None:
        gamma = cfg.gamma if isinstance(cfg.gamma, int) else getattr(cfg.gamma, "gamma_max", None)
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            return {}                                    # the decoding call names the bad gamma itself
    P = max(len(p) for p in prompts)
    batch = len(prompts) if slots is None else min(slots, len(prompts))
    return check_batch_fits(model, head, max(batch, 1), decode_slots(P, cfg, gamma, turns, slots), gamma,
                            prompt_len=P, backend=cfg.backend)
