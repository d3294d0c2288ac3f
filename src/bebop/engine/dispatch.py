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
from bebop.engine.turns import Turns, turns_decode

__all__ = ["DecodeConfig", "Turns", "decode"]


def decode(model: PreTrainedModel, head, prompts: list[list[int]], cfg: DecodeConfig,
           turns: Turns | None = None, slots: int | None = None) -> Rollout:
    """Decode ``prompts``: multi-turn when ``turns`` is given (plain or MTP by ``head``), else MTP speculative
    sampling with ``head`` (DESIGN §3), else plain sampling; with ``slots``, through continuous batching with at most
    that many rows in flight (a static batch of all prompts otherwise). ``Rollout.sampled_mask`` marks the model's
    tokens in every case (environment tokens are not sampled)."""
    if slots is not None:
        return continuous_decode(model, head, prompts, cfg, slots, turns)
    if turns is not None:
        return turns_decode(model, head, prompts, cfg, turns)
    if head is not None:
        return mtp_decode(model, head, prompts, cfg)
    return generate(model, prompts, cfg.params, cfg.max_new_tokens, cfg.eos_id, cfg.pad_id, cfg.generator,
                    cfg.backend)
