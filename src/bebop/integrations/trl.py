"""Bebop's MTP-drafted rollouts inside TRL's ``GRPOTrainer`` (``pip install 'bebop[trl]'``).

``GRPOTrainer(..., rollout_func=mtp_rollout_func(head))`` replaces TRL's generation with Bebop's engine: the
trainer's *current* policy drafts with the frozen MTP head and verifies by lossless rejection sampling (DESIGN §3),
so the completions follow the policy's own law under the trainer's sampling settings, exactly as TRL's own
generation would, only faster. TRL calls the function with the prompts of one generation batch (each prompt
repeated ``num_generations`` times in a row by TRL's sampler) and the trainer; it returns, per prompt,
``prompt_ids``, ``completion_ids`` and ``logprobs`` — the **target's** log-probabilities of the emitted tokens under
the sampling transforms (τ, top-k, top-p), never the draft's — plus any extra columns, which TRL passes to the
reward functions.

Which settings are read from the trainer (``trainer.args``): ``temperature``, ``top_p``, ``top_k`` (0 = off),
``max_completion_length``. ``repetition_penalty`` ≠ 1 and ``min_p`` change the sampling law in ways the engine does
not implement, so they are refused with one error rather than silently ignored. Prompts are tokenised by the
trainer itself (its chat template, generation prompt and special tokens), so a run with and without Bebop sees the
same prompt ids. Completions stop at the tokenizer's EOS token, which they include, as TRL's generation does.

The head's own weights stay frozen (the Bebop recipe: a head trained with e2e TV before RL keeps its acceptance
through RL). If the head shares the embedding and LM head with the policy (Bebop heads reference the policy's own
modules, never copies), then while the policy trains the head drafts through the *updated* embedding and LM head:
its drafts track the policy's output layer, and only its own block is fixed. The draft law never affects the
emitted law, only the speed.

The engine's fast forwards keep fused copies of the weights and rebuild them when a weight's version counter moves;
the optimizers of transformers' ``Trainer`` can update parameters without moving it, so every call rebuilds them
(one copy of the weights per generation batch). Under the trainer's mixed precision (``bf16=True``, TRL's default
where supported) generation runs inside the trainer's autocast, as TRL's own generation does.

Decode metrics (per-step α, accept length, tokens/s, seconds) are added to the trainer's logged metrics under
``bebop/…`` and kept on the returned function's ``history`` list.

**Multi-turn episodes** (``env=``): a row pauses when it emits ``stop`` (a token id or token string, e.g. the end of
a tool call), ``env(prompt, transcript)`` answers with the reply's token ids (or None to end the row), and the reply
is prefilled into the caches and decoding resumes with MTP drafting (``bebop.engine.turns``; no prefix is ever
recomputed). ``prompt`` is the row's TRL prompt (text or messages), ``transcript`` the row's token ids after it so
far. The completion then holds model and environment tokens, and the returned ``env_mask`` (1 = model token,
0 = environment token) tells TRL which tokens carry the loss; environment tokens get log-prob 0. This replaces
TRL's own tool loop (``tools=`` / ``environment_factory=``), which runs after the rollout function and re-generates
through ``model.generate``; pass one or the other. ``AsyncGRPOTrainer``'s ``rollout_worker`` protocol (experimental
in TRL 1.16) is built around a vLLM server with weight transfer (``pause``, ``send_weights``, NCCL groups); it is not
wrapped until that protocol settles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bebop.core.sampling import SamplingParams
from bebop.engine.dispatch import DecodeConfig, Turns, decode
from bebop.errors import BebopError
from bebop.models.checkpoint import load_head
from bebop.models.lean import forget
from bebop.models.mtp import MTPHead

__all__ = ["BebopRollout", "mtp_rollout_func", "sampling_params"]


def sampling_params(args: Any) -> SamplingParams:
    """Bebop's sampling transforms from a TRL ``GRPOConfig``: τ, top-k (0/None = off), top-p (1.0 = off); the
    settings the engine cannot reproduce exactly are refused, naming them."""
    rep = getattr(args, "repetition_penalty", 1.0)
    if rep not in (None, 1.0):
        raise BebopError(f"repetition_penalty {rep} is not supported by Bebop's exact sampler; use 1.0")
    min_p = getattr(args, "min_p", None)
    if min_p not in (None, 0.0):
        raise BebopError(f"min_p {min_p} is not supported by Bebop's exact sampler; use None")
    top_k = getattr(args, "top_k", None)
    top_p = getattr(args, "top_p", 1.0)
    return SamplingParams(temperature=float(args.temperature), top_k=int(top_k) if top_k else None,
                          top_p=None if top_p in (None, 1.0) else float(top_p))


@dataclass
class BebopRollout:
    """A ``rollout_func`` for TRL's ``GRPOTrainer`` (module doc). ``head``: an ``MTPHead``, a head path
    (directory or ``.safetensors``), ``"native"`` (the policy checkpoint's own MTP layer), or None (Bebop's plain
    decoding, one target forward per token); ``gamma``: draft length, or ``"auto"`` (adaptive drafting up to
    ``gamma_max``, ``bebop.experimental.adaptive``); ``rule``: ``rejection`` or ``target_only`` (``auto`` with
    ``gamma="auto"``: RS or TO per row); ``backend``: the engine's forwards; ``seed``: the rollouts' random
    generator (None: torch's global one); ``env``, ``stop``, ``turn_tokens``, ``max_turns``: multi-turn episodes
    (module doc)."""

    head: MTPHead | str | Path | None
    gamma: int | str = 3
    rule: str = "rejection"
    backend: str = "auto"
    seed: int | None = None
    gamma_max: int = 5
    env: Callable[[Any, list[int]], list[int] | None] | None = None
    stop: int | str | None = None
    turn_tokens: int | None = None
    max_turns: int | None = None

    def __post_init__(self) -> None:
        self._policy = None
        self.history: list[dict[str, Any]] = []
        self._head: MTPHead | None = self.head if isinstance(self.head, MTPHead) else None
        self._bound_to: Any = None
        self._generator: torch.Generator | None = None
        if self.gamma != "auto" and (isinstance(self.gamma, bool) or not isinstance(self.gamma, int)
                                     or self.gamma < 1):
            raise BebopError(f"gamma must be an integer >= 1 or 'auto', got {self.gamma!r}")
        if (self.env is None) != (self.stop is None):
            raise BebopError("multi-turn rollouts need both env= and stop= (the token that hands the turn over)")

    def _head_for(self, model) -> MTPHead | None:
        """The frozen head, loaded (once) for ``model`` and bound to its embedding and LM head."""
        if self.head is None:
            return None
        if self._head is None:
            self._head = load_head(self.head, model)
        if self._bound_to is not model:
            self._head.bind(model)
            self._head.to(model.get_input_embeddings().weight.device)
            self._head.requires_grad_(False)
            self._head.eval()
            self._bound_to = model
        return self._head

    def _gamma(self, model, head: MTPHead, prompt_ids: list[list[int]], cfg: DecodeConfig):
        """The fixed γ, or (``"auto"``) an adaptive drafting policy calibrated once, on the first batch, for this
        batch size (``bebop.experimental.adaptive.calibrate``)."""
        if self.gamma != "auto" or head is None:
            return self.gamma
        if self._policy is None:
            from bebop.experimental.adaptive import calibrate

            self._policy = calibrate(model, head, [prompt_ids], cfg, self.gamma_max, self.seed or 0, repeats=1)
        from bebop.experimental.adaptive import as_policy

        return as_policy(self._policy, self.rule)

    def __call__(self, prompts: list, trainer: Any) -> dict[str, list]:
        model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
        tok = trainer.processing_class
        params = sampling_params(trainer.args)
        prompt_ids = [list(map(int, p)) for p in trainer._tokenize_prompts(prompts)[0]]
        eos = getattr(tok, "eos_token_id", None)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
        device = model.get_input_embeddings().weight.device
        if self.seed is not None and self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        cfg = DecodeConfig(params, int(trainer.args.max_completion_length), eos, 3, self.rule, pad, self._generator,
                           self.backend)
        was_training = model.training
        model.eval()
        try:
            head = self._head_for(model)
            forget(model, *([head] if head is not None else []))   # optimizers may write weights unversioned
            cfg.gamma = self._gamma(model, head, prompt_ids, cfg)
            t0 = time.perf_counter()
            out = decode(model, head, prompt_ids, cfg, self._turns(prompts, tok))
            seconds = time.perf_counter() - t0
        finally:
            model.train(was_training)
        completions = out.completions()
        logprobs = [row[: len(c)].tolist() for row, c in zip(out.logprobs, completions, strict=True)]
        extra = {}
        if self.env is not None:
            extra["env_mask"] = [row[: len(c)].long().tolist() for row, c in zip(out.sampled_mask, completions,
                                                                                  strict=True)]
        m = out.metrics
        metrics = {"tokens_per_s": m.tokens / max(seconds, 1e-9), "rollout_s": seconds}
        if head is not None:
            metrics.update(accept_length=m.accept_length, **{f"alpha_{k + 1}": a for k, a in enumerate(m.alpha)})
        self.history.append(metrics)
        logged = getattr(trainer, "_metrics", None)
        if isinstance(logged, dict) and "train" in logged:
            for k, v in metrics.items():
                logged["train"][f"bebop/{k}"].append(float(v))
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": logprobs, **extra}

    def _turns(self, prompts: list, tok) -> Turns | None:
        """The engine's environment for this batch: row b's replies come from ``env(prompts[b], transcript)``."""
        if self.env is None:
            return None
        stop = self.stop if isinstance(self.stop, int) else tok.convert_tokens_to_ids(self.stop)
        if not isinstance(stop, int) or stop < 0 or (isinstance(self.stop, str) and stop == tok.unk_token_id):
            raise BebopError(f"stop token {self.stop!r} is not in the tokenizer's vocabulary")

        def env(row: int, transcript: list[int]) -> list[int] | None:
            reply = self.env(prompts[row], transcript)
            return None if reply is None else [int(t) for t in reply]

        return Turns(env, stop, self.turn_tokens, self.max_turns)


def mtp_rollout_func(head: MTPHead | str | Path | None, gamma: int | str = 3, rule: str = "rejection",
                     backend: str = "auto", seed: int | None = None, **turns: Any) -> Callable[[list, Any], dict]:
    """``GRPOTrainer(..., rollout_func=mtp_rollout_func(head, gamma=3))``: see :class:`BebopRollout` (``turns``:
    ``env``, ``stop``, ``turn_tokens``, ``max_turns`` for multi-turn episodes)."""
    return BebopRollout(head, gamma, rule, backend, seed, **turns)
