"""Pre-RL MTP head training (DESIGN §4): backbone frozen, data = the policy's own samples.

Teacher forcing: for position t and step k = 1..γ the head's step-k distribution q_k(t) (recursive unroll
fed with the TRUE tokens) is trained towards the frozen base model's distribution p_k(t) for token t+k+1
(at the rollout temperature). Positions where not all γ targets exist, and prompt positions, are masked.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bebop.config import positive
from bebop.core.losses import LOSSES, mtp_loss_from_hidden
from bebop.core.sampling import SamplingParams, probs_from_logits, total_variation
from bebop.engine.decode import generate
from bebop.engine.turns import generate_turns
from bebop.errors import BebopError
from bebop.models.mtp import MTPHead, export_head, load_head, save_head
from bebop.models.policy import load_policy
from bebop.tasks import get_task, sample_problems
from bebop.training.multiturn import is_multi_turn, task_env
from bebop.training.sft import warmup_cosine


@dataclass
class TrainMTPConfig:
    model: str = "runs/arith/base"
    out: str = "runs/arith/mtp_e2e_tv"
    task: str = "arith"
    loss: str = "e2e_tv"
    gamma_train: int = 5
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0        # rollout temperature: of the policy samples and of the target p
    data_samples: int = 2048        # policy samples used as training data
    heldout_samples: int = 256
    max_new_tokens: int = 96
    eval_every: int = 50
    seed: int = 0
    init: str | None = None         # start from an existing head (e.g. CE/fkl-trained) instead of the warm start

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise BebopError(f"unknown loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if self.gamma_train < 1:
            raise BebopError(f"gamma_train must be >= 1, got {self.gamma_train}")
        for name in ("steps", "batch_size", "lr", "data_samples", "heldout_samples", "max_new_tokens", "eval_every"):
            positive(name, getattr(self, name))
        if not self.temperature > 0:
            raise BebopError(f"temperature must be > 0 for MTP training, got {self.temperature}")
        get_task(self.task)


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
        if is_multi_turn(task):
            r = generate_turns(model, None, prompts, params, max_new_tokens, tokenizer.eos_token_id,
                               tokenizer.convert_tokens_to_ids(task.terminator), task_env(task, tokenizer, chunk),
                               pad_id=tokenizer.pad_token_id, generator=gen)
        else:
            r = generate(model, prompts, params, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, gen)
        out += [(pr + c, len(pr)) for pr, c in zip(prompts, r.completions(), strict=True)]
    return out


def usable(rows: list[tuple[list[int], int]], gamma: int) -> list[tuple[list[int], int]]:
    """Sequences with at least one trainable position: ≥ γ + 1 completion tokens."""
    return [(ids, n) for ids, n in rows if len(ids) - n >= gamma + 1]


def pad_batch(rows: list[tuple[list[int], int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded ``(ids, mask, prompt_lens)``."""
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, (r, _) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    lens = torch.tensor([len(r) for r, _ in rows])
    mask = (torch.arange(width)[None, :] < lens[:, None]).long()
    return ids.to(device), mask.to(device), torch.tensor([n for _, n in rows], device=device)


def teacher_forced(model, head: MTPHead, ids, mask, prompt_lens, gamma: int):
    """Hidden states over valid positions t: the head's step-k output ``hq`` [N, γ, H], the base model's
    hidden state ``hp`` [N, γ, H] at position t+k (whose LM-head distribution is the target p_k(t)), and the
    data tokens ``y`` [N, γ]. Step k at t consumes x_{t+k}, h^{k-1}_t and predicts x_{t+k+1}.
    Valid: t ≥ prompt_len − 1 (the completion is what gets drafted) and x_{t+γ+1} is a real token.
    Logits are not formed here, so the memory-bounded losses never hold [N, γ, V]."""
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    hs = head.unroll(ids, hidden, gamma, attention_mask=mask)
    T = ids.shape[1]
    n_pos = T - gamma - 1
    if n_pos <= 0:
        raise BebopError(f"sequences of length {T} are too short for gamma_train {gamma}")
    t = torch.arange(n_pos, device=ids.device)
    valid = (t[None, :] >= prompt_lens[:, None] - 1) & (mask[:, gamma + 1 :] == 1)
    hq = torch.stack([h[:, :n_pos] for h in hs], dim=2)                                   # [B, n, γ, H]
    hp = torch.stack([hidden[:, k : k + n_pos] for k in range(1, gamma + 1)], dim=2)      # [B, n, γ, H]
    y = torch.stack([ids[:, k + 1 : k + 1 + n_pos] for k in range(1, gamma + 1)], dim=2)  # [B, n, γ]
    return hq[valid], hp[valid], y[valid]


@torch.no_grad()
def expected_alpha(model, head, data, gamma: int, params: SamplingParams, pad_id: int, batch_size: int = 64):
    """Per-step teacher-forced RS acceptance α_k = E_t[1 − TV(p_k(t), q_k(t))] on ``data``."""
    tot = torch.zeros(gamma)
    n = 0
    for i in range(0, len(data), batch_size):
        ids, mask, pl = pad_batch(data[i : i + batch_size], pad_id, model.device)
        hq, hp, _ = teacher_forced(model, head, ids, mask, pl, gamma)
        lm_head = model.get_output_embeddings()
        q, p = probs_from_logits(lm_head(hq), params), probs_from_logits(lm_head(hp), params)
        tot += (1.0 - total_variation(p, q)).sum(0).cpu()
        n += hq.shape[0]
    return (tot / max(n, 1)).tolist()


def train_mtp(cfg: TrainMTPConfig, device: str = "cpu") -> dict:
    """Train a head for the policy in ``cfg.model``; saves Bebop + public layouts to ``cfg.out``."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(cfg.model, device)
    model.requires_grad_(False)
    task = get_task(cfg.task)
    params = SamplingParams(temperature=cfg.temperature)
    data = policy_samples(model, tokenizer, task, cfg.data_samples, cfg.temperature, cfg.max_new_tokens, cfg.seed)
    heldout = policy_samples(model, tokenizer, task, cfg.heldout_samples, cfg.temperature, cfg.max_new_tokens,
                             cfg.seed + 1_000_003)
    data, heldout = (usable(rows, cfg.gamma_train) for rows in (data, heldout))
    if not data or not heldout:
        raise BebopError(f"no usable training data: every policy sample has fewer than gamma_train + 1 = "
                         f"{cfg.gamma_train + 1} completion tokens (max_new_tokens={cfg.max_new_tokens})")
    head = (load_head(cfg.init, model) if cfg.init else MTPHead.from_base(model)).to(device)
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_mtp.jsonl"
    t0 = time.perf_counter()
    history = []
    with log_path.open("w") as log, Progress(
        TextColumn(f"[bold]train-mtp {cfg.loss}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
    ) as progress:
        bar = progress.add_task("train", total=cfg.steps, loss=float("nan"))
        for step in range(cfg.steps):
            lr = warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr, floor=0.0)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.randint(len(data), (cfg.batch_size,), generator=gen).tolist()
            ids, mask, pl = pad_batch([data[i] for i in idx], tokenizer.pad_token_id, device)
            hq, hp, y = teacher_forced(model, head, ids, mask, pl, cfg.gamma_train)
            loss = mtp_loss_from_hidden(cfg.loss, hq, hp, model.get_output_embeddings().weight, cfg.temperature, y,
                                        torch.ones(len(y), device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            opt.step()
            progress.update(bar, completed=step + 1, loss=loss.item())
            if step % cfg.eval_every == 0 or step == cfg.steps - 1:
                head.eval()
                alpha = expected_alpha(model, head, heldout, cfg.gamma_train, params, tokenizer.pad_token_id)
                head.train()
                rec = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": float(gnorm),
                       "heldout_alpha": alpha, "elapsed_s": time.perf_counter() - t0}
                history.append(rec)
                log.write(json.dumps(rec) + "\n")
                log.flush()
    head.eval()
    save_head(head, out, model.config)
    export_head(head, out / "qwen3_5_mtp.safetensors", "qwen3_5")
    export_head(head, out / "deepseek_v3_mtp.safetensors", "deepseek_v3",
                num_base_layers=model.config.num_hidden_layers)
    summary = {"config": asdict(cfg), "heldout_alpha": history[-1]["heldout_alpha"],
               "train_seconds": time.perf_counter() - t0}
    (out / "train_mtp_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
