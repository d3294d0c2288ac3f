"""Multi-turn rollouts for tool-use tasks: the native engine path, and a re-prefill reference.

``rollout_multi_turn`` runs ``bebop.engine.turns.generate_turns``: each row pauses at the task's terminator token,
the environment's reply (``task.step``) is prefilled into the KV caches, and decoding resumes without
recomputing the prefix (plain sampling, or MTP drafting with a head).

``rollout_multi_turn_reprefill`` is the slow but obviously correct reference the native path is tested
against: each round samples every unfinished row with ``engine.generate`` from its whole context (prompt,
model tokens and environment tokens so far) until the terminator, EOS or ``turn_tokens``; a row that stopped
at the terminator gets ``task.step``'s response appended as plain context, and the next round re-prefills it.
"""

from __future__ import annotations

import torch

from bebop.core.sampling import SamplingParams
from bebop.engine.decode import generate
from bebop.engine.turns import generate_turns
from bebop.tasks import Problem, Task


def is_multi_turn(task: Task) -> bool:
    """True for tasks with an environment (``step`` and ``terminator``), e.g. ``agent``."""
    return callable(getattr(task, "step", None)) and isinstance(getattr(task, "terminator", None), str)


def rollout_multi_turn_reprefill(model, tokenizer, task: Task, problems: list[Problem], params: SamplingParams,
                                 max_new_tokens: int, generator: torch.Generator | None = None,
                                 turn_tokens: int = 32) -> tuple[list[str], float, int]:
    """Transcripts (text after each prompt, model and environment text), and the summed entropy and count
    of the model-sampled tokens; each row stops at EOS, a ``None`` step or ``max_new_tokens`` tokens."""
    stop_id = tokenizer.convert_tokens_to_ids(task.terminator)
    eos_id = tokenizer.eos_token_id
    prompts = [tokenizer(p.prompt)["input_ids"] for p in problems]
    done_ids: list[list[int]] = [[] for _ in problems]
    active = list(range(len(problems)))
    ent_sum, n_tok = 0.0, 0
    while active:
        budget = min(turn_tokens, max_new_tokens - min(len(done_ids[i]) for i in active))
        r = generate(model, [prompts[i] + done_ids[i] for i in active], params, budget, stop_id,
                     tokenizer.pad_token_id, generator)
        still = []
        for row, (i, toks) in enumerate(zip(active, r.completions(), strict=True)):
            if eos_id in toks:
                toks = toks[: toks.index(eos_id) + 1]
            toks = toks[: max_new_tokens - len(done_ids[i])]
            ent_sum += float(r.entropy[row, : len(toks)].sum())
            n_tok += len(toks)
            done_ids[i] += toks
            if not toks or toks[-1] != stop_id:
                continue
            response = task.step(problems[i], tokenizer.decode(done_ids[i], skip_special_tokens=True))
            if response is None:
                continue
            done_ids[i] += tokenizer(response, add_special_tokens=False)["input_ids"]
            if len(done_ids[i]) < max_new_tokens:
                still.append(i)
        active = still
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in done_ids]
    return texts, ent_sum, n_tok


def task_env(task: Task, tokenizer, problems: list[Problem]):
    """The engine's environment callback for ``task``: row index + transcript ids → reply ids or None (done)."""

    def env(row: int, transcript: list[int]) -> list[int] | None:
        response = task.step(problems[row], tokenizer.decode(transcript, skip_special_tokens=True))
        return None if response is None else tokenizer(response, add_special_tokens=False)["input_ids"]

    return env


def rollout_multi_turn(model, tokenizer, task: Task, problems: list[Problem], params: SamplingParams,
                       max_new_tokens: int, generator: torch.Generator | None = None,
                       turn_tokens: int = 32, head=None, gamma: int = 3,
                       rule: str = "rejection") -> tuple[list[str], float, int]:
    """As ``rollout_multi_turn_reprefill`` (same stopping rules, same outputs at τ = 0, same law at τ > 0),
    natively: one prefill per environment reply, of the reply only. ``head`` switches on MTP drafting."""
    prompts = [tokenizer(p.prompt)["input_ids"] for p in problems]
    r = generate_turns(model, head, prompts, params, max_new_tokens, tokenizer.eos_token_id,
                       tokenizer.convert_tokens_to_ids(task.terminator), task_env(task, tokenizer, problems),
                       gamma=gamma, rule=rule, pad_id=tokenizer.pad_token_id, generator=generator,
                       turn_tokens=turn_tokens)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in r.completions()]
    return texts, float((r.entropy * r.sampled).sum()), int(r.sampled.sum())
