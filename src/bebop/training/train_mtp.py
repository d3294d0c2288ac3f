"""Pre-RL MTP head training (DESIGN §4): backbone frozen, data = the policy's own samples.

Teacher forcing: for position t and step k = 1..γ the head's step-k distribution q_k(t) (recursive unroll
fed with the TRUE tokens) is trained towards the frozen base model's distribution p_k(t) for token t+k+1
(at the rollout temperature). Positions where not all γ targets exist, and prompt positions, are masked.
A run is a list of stages on the same data: by default a forward-KL warm stage, then the chosen loss. With
``patience`` a stage stops early once held-out expected α has stopped improving, and keeps its best head
(``training.early_stop``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TextIO

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bebop.config import check_device, check_dtype, check_gamma, positive
from bebop.core.losses import LOSSES, mtp_loss_from_hidden
from bebop.core.sampling import SamplingParams, probs_from_logits, total_variation
from bebop.engine.forwards import decoding_path
from bebop.errors import BebopError
from bebop.io import atomic_write_text
from bebop.models.checkpoint import NATIVE, export_head, load_head, save_head
from bebop.models.device import Precision, precision
from bebop.models.mtp import MTPHead
from bebop.models.native import has_native_mtp, native_layout
from bebop.models.policy import load_policy
from bebop.training.distributed import (
    SINGLE,
    Dist,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_objects,
    process_group,
    shard,
)
from bebop.training.early_stop import EarlyStop, heldout_score
from bebop.training.options import DataSource
from bebop.training.samples import training_rows
from bebop.training.sft import warmup_cosine
from bebop.training.train_state import CHECKPOINT_DIR, TrainState, check_resumable, load_state, save_state


@dataclass
class TrainMTPConfig:
    """One head-training run. TV-type gradients are bounded by q and vanish where q and p are far apart
    (DESIGN §4), so ``tv`` / ``e2e_tv`` learn slowly from a random head; every run therefore starts warm:

    * ``init = None`` (default): the checkpoint's own MTP layer when it ships one (Qwen3.5, Qwen3-Next,
      DeepSeek-V3, GLM), otherwise a fresh head from the family's decoder layer trained ``warm_steps`` of
      ``warm_loss`` (forward KL) first;
    * ``init = "native"``: the checkpoint's own MTP layer, an error when it has none;
    * ``init = PATH``: a head saved by Bebop (or in a public layout).

    Then ``steps`` of ``loss``. ``warm_steps = 0`` trains ``loss`` from the fresh head directly.

    Held-out expected α is measured every ``eval_every`` steps (and at a stage's last step). With ``patience > 0``
    each stage stops early once the mean of α over the γ_train steps has not beaten its best by more than
    ``min_delta`` for ``patience`` measurements in a row, and ends with the head of its best measurement from step
    ``min_steps`` on; ``steps`` and ``warm_steps`` are then budgets. ``patience = 0`` (default) trains every step
    and keeps the last head."""

    model: str = "runs/arith/base"
    out: str = "runs/arith/mtp_e2e_tv"
    task: str | None = None         # built-in task prompts (default ``arith`` when no other source is given)
    prompts: str | None = None      # JSONL of {"prompt"} or {"messages"} (rendered with the chat template)
    dataset: str | None = None      # a ``datasets`` dataset: local file/dir, cached or hub name
    split: str = "train"
    field: str | None = None        # the dataset's prompt column (default "prompt", else "messages")
    completions: str | None = None  # JSONL of existing rollouts: prompt + completion, no generation
    cache_dir: str | None = None    # policy-sample cache (default $BEBOP_CACHE or ~/.cache/bebop/samples); "" = off
    loss: str = "e2e_tv"
    gamma_train: int = 3
    steps: int = 300                # steps of ``loss`` (after the warm stage)
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0        # rollout temperature: of the policy samples and of the target p
    data_samples: int = 4096        # policy samples used as training data
    heldout_samples: int = 256
    max_new_tokens: int = 96
    eval_every: int = 50
    patience: int = 0               # held-out evaluations without improvement before a stage stops (0: never)
    min_delta: float = 0.0          # improvement of the mean held-out α that counts as one
    min_steps: int = 0              # steps a stage trains before early stopping watches it (and may keep its head)
    seed: int = 0
    init: str | None = None         # None: native head if any, else warm stage; "native"; or a head path
    head_layers: int | None = None  # MTP layers of a fresh head (None: 1); a loaded head keeps its own count
    warm_loss: str = "fkl"
    warm_steps: int = 800
    warm_lr: float = 5e-3
    device: str = "auto"            # auto | cpu | cuda | cuda:i (auto: CUDA when available)
    dtype: str = "auto"             # backbone and compute dtype; the head trains with float32 weights (models.device)
    checkpoint_every: int = 100     # steps between atomic checkpoints in ``out/checkpoint`` (0: none); runs resume

    def __post_init__(self) -> None:
        for name in (self.loss, self.warm_loss):
            if name not in LOSSES:
                raise BebopError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
        check_gamma(self.gamma_train, "gamma_train")
        for name in ("steps", "batch_size", "lr", "data_samples", "heldout_samples", "max_new_tokens", "eval_every",
                     "warm_lr"):
            positive(name, getattr(self, name))
        for name in ("warm_steps", "patience", "min_delta", "min_steps"):
            if not getattr(self, name) >= 0:
                raise BebopError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise BebopError(f"temperature must be > 0 for MTP training, got {self.temperature}")
        if self.head_layers is not None:
            positive("head_layers", self.head_layers)
        self.source.check()
        if self.checkpoint_every < 0:
            raise BebopError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        check_device(self.device)
        check_dtype(self.dtype)

    @property
    def source(self) -> DataSource:
        """The run's prompt source (the ``arith`` task when none is given)."""
        return DataSource(self.task, self.prompts, self.dataset, self.split, self.field, self.completions).resolved()

    def stages(self, warm: bool = True) -> list[Stage]:
        """The training stages in order: the warm stage (only for a fresh head, ``warm``), then ``loss``."""
        main = Stage("main", self.loss, self.steps, self.lr)
        if not warm or self.init or not self.warm_steps:
            return [main]
        return [Stage("warm", self.warm_loss, self.warm_steps, self.warm_lr), main]


def initial_head(init: str | None, model, layers: int | None = None) -> tuple[MTPHead, str]:
    """The head a run starts from and where it came from (``"native"``, ``"fresh"`` or the path): see
    :class:`TrainMTPConfig` for what ``init`` selects. ``layers``: a fresh head's MTP layer count (default 1); a
    loaded head with another count is an error, never silently rebuilt."""
    if init is None and not has_native_mtp(model):
        return MTPHead.from_base(model, num_layers=layers or 1), "fresh"
    start = NATIVE if init is None else init
    head = load_head(start, model)
    if layers is not None and head.num_layers != layers:
        raise BebopError(f"head_layers {layers} does not match the starting head {start!r}, which has "
                         f"{head.num_layers} MTP layer(s); drop head_layers or start from a fresh head")
    return head, start


@dataclass(frozen=True)
class Stage:
    """One stage of head training: ``steps`` optimizer steps of ``loss`` at peak learning rate ``lr``, with a
    fresh optimizer and warm-up/cosine schedule."""

    name: str
    loss: str
    steps: int
    lr: float


def pad_batch(rows: list[tuple[list[int], int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded ``(ids, mask, prompt_lens)``."""
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, (r, _) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    lens = torch.tensor([len(r) for r, _ in rows])
    mask = (torch.arange(width)[None, :] < lens[:, None]).long()
    return ids.to(device), mask.to(device), torch.tensor([n for _, n in rows], device=device)


def teacher_forced(model, head: MTPHead, ids, mask, prompt_lens, gamma: int, unroll=None):
    """Hidden states over valid positions t: the head's step-k output ``hq`` [N, γ, H], the base model's
    hidden state ``hp`` [N, γ, H] at position t+k (whose LM-head distribution is the target p_k(t)), and the
    data tokens ``y`` [N, γ]. Step k at t consumes x_{t+k}, h^{k-1}_t and predicts x_{t+k+1}.
    Valid: t ≥ prompt_len − 1 (the completion is what gets drafted) and x_{t+γ+1} is a real token.
    Logits are not formed here, so the memory-bounded losses never hold [N, γ, V]. ``unroll`` replaces
    ``head.unroll`` (the DDP-wrapped head in multi-process training)."""
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    hs = (unroll or head.unroll)(ids, hidden, gamma, attention_mask=mask)
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


def mixed_autocast(model, head) -> contextlib.AbstractContextManager:
    """Autocast in the lower of the backbone's and the head's weight dtypes when they differ (a float32 head over
    a bf16 backbone, as in training), else a no-op: so a head is measured in the precision it trains in."""
    low = model.get_input_embeddings().weight.dtype
    other = next(head.parameters()).dtype
    if low == other:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=other if low == torch.float32 else low)


@torch.no_grad()
def expected_alpha(model, head, data, gamma: int, params: SamplingParams, pad_id: int, batch_size: int = 64,
                   dist: Dist = SINGLE):
    """Per-step teacher-forced RS acceptance α_k = E_t[1 − TV(p_k(t), q_k(t))] on ``data``; p and q are
    computed in float32 from the logits (``probs_from_logits``) whatever dtype the model runs in. Under several
    processes each rank measures its share of ``data`` and the sums are reduced, so every rank gets the same α."""
    data = shard(data, dist)
    tot = torch.zeros(gamma, dtype=torch.float64)
    n = 0
    for i in range(0, len(data), batch_size):
        ids, mask, pl = pad_batch(data[i : i + batch_size], pad_id, model.device)
        with mixed_autocast(model, head):
            hq, hp, _ = teacher_forced(model, head, ids, mask, pl, gamma)
            lm_head = model.get_output_embeddings()
            zq, zp = lm_head(hq), lm_head(hp)
        q, p = probs_from_logits(zq, params), probs_from_logits(zp, params)
        tot += (1.0 - total_variation(p, q)).sum(0).double().cpu()
        n += hq.shape[0]
    both = all_reduce_sum(torch.cat([tot, torch.tensor([float(n)], dtype=torch.float64)]), dist)
    return (both[:gamma] / max(float(both[gamma]), 1.0)).tolist()


class _Unroll(torch.nn.Module):
    """The head's teacher-forced unroll as ``forward``, so that ``DistributedDataParallel`` can wrap it (DDP hooks
    only ``forward``). The shared embedding and LM head are not parameters of the head, so they stay frozen and
    outside DDP."""

    def __init__(self, head: MTPHead):
        super().__init__()
        self.head = head

    def forward(self, ids, hidden, gamma: int, attention_mask=None):
        return self.head.unroll(ids, hidden, gamma, attention_mask=attention_mask)


BEST = "best."  # prefix, in a checkpoint's head tensors, of the stage's best head so far (early stopping)


@dataclass
class _Run:
    """What every stage of one run shares: the frozen policy, its samples, the config, the log file, the precision
    (the head's forwards and losses run under its autocast), this process's place in the job and the head's
    trainable unroll (DDP-wrapped under several processes)."""

    cfg: TrainMTPConfig
    model: object
    pad_id: int
    data: list[tuple[list[int], int]]
    heldout: list[tuple[list[int], int]]
    log: TextIO | None
    t0: float
    prec: Precision
    dist: Dist
    unroll: torch.nn.Module
    history: list[dict]
    step_seconds: float = 0.0
    stages: tuple[Stage, ...] = ()
    checkpoint: tuple[int, int] | None = None      # (stage index, step) of the last checkpoint written
    best: dict[str, torch.Tensor] | None = None    # the current stage's best head (early stopping only)


def _batch_loss(run: _Run, head: MTPHead, loss_name: str, idx: list[int]) -> tuple[torch.Tensor, float]:
    """This rank's share of one global batch: the loss to backpropagate, scaled so that DDP's mean over ranks is
    the gradient of the mean over the whole batch's valid positions, and that global mean's value."""
    cfg, model = run.cfg, run.model
    ids, mask, pl = pad_batch([run.data[i] for i in idx], run.pad_id, model.device)
    with run.prec.autocast():
        hq, hp, y = teacher_forced(model, head, ids, mask, pl, cfg.gamma_train, unroll=run.unroll)
        w = model.get_output_embeddings().weight   # hidden states meet the LM head in its own dtype
        loss = mtp_loss_from_hidden(loss_name, hq.to(w.dtype), hp.to(w.dtype), w, cfg.temperature, y,
                                    torch.ones(len(y), device=model.device))
    if not run.dist.active:
        return loss, loss.item()
    local = torch.tensor([float(len(y)), loss.item() * len(y)], dtype=torch.float64)
    total = all_reduce_sum(local.clone(), run.dist)
    share = float(local[0] / total[0]) * run.dist.world
    return loss * share, float(total[1] / total[0])


def _non_finite(run: _Run, stage: Stage, step: int, what: str, value: float) -> BebopError:
    """The error a run stops with when ``what`` is NaN or inf at ``stage``'s step ``step``: raised before that
    step's optimizer step and before any checkpoint is written, so the last checkpoint is the last good state."""
    where = Path(run.cfg.out) / CHECKPOINT_DIR
    if run.checkpoint is None:
        hint = "no checkpoint was written yet"
    else:
        hint = (f"the last checkpoint ({run.stages[run.checkpoint[0]].name} stage, step {run.checkpoint[1]}) in "
                f"{where} is intact: rerun the same command to resume from it")
    return BebopError(f"train-mtp stopped at step {step} of the {stage.name} stage: non-finite {what} ({value}); "
                      f"the optimizer step was not taken, {hint}")


def _checkpoint(run: _Run, head: MTPHead, opt, scaler, gen: torch.Generator, stage: int, step: int) -> None:
    """Rank 0 saves where the run stands (continue at ``stage``'s step ``step``)."""
    run.checkpoint = (stage, step)
    tensors = head.state_dict()
    if run.best is not None:  # the best head travels with the checkpoint, so a resumed run can still end with it
        tensors = {**tensors, **{BEST + k: v for k, v in run.best.items()}}
    if run.dist.is_main:
        save_state(run.cfg.out, TrainState(stage, step, asdict(run.cfg), list(run.history), tensors,
                                           opt.state_dict() if opt is not None else None,
                                           scaler.state_dict() if scaler is not None and scaler.is_enabled()
                                           else None, gen.get_state()))


def stage_scores(history: list[dict], stage: str) -> list[tuple[int, float]]:
    """``(step, held-out score)`` of every evaluation of ``stage`` logged in ``history``, in order."""
    return [(r["step"], heldout_score(r["heldout_alpha"])) for r in history if r["stage"] == stage]


def stage_outcome(cfg: TrainMTPConfig, stage: Stage, history: list[dict]) -> dict:
    """How a finished stage ended, from its logged evaluations: the last step it trained, whether that was early, and
    its best evaluation from step ``cfg.min_steps`` on (the head it kept when ``cfg.patience`` is set; None when no
    evaluation came that late, and the stage kept its last head)."""
    scores = stage_scores(history, stage.name)
    tracker = EarlyStop.replay(cfg.patience, cfg.min_delta, cfg.min_steps, scores)
    last = scores[-1][0] if scores else None
    return {"stage": stage.name, "budget": stage.steps, "last_step": last,
            "stopped_early": last is not None and last < stage.steps - 1,
            "best_step": tracker.best_step, "best_score": tracker.best if tracker.best_step is not None else None}


def _train_stage(run: _Run, head: MTPHead, stage: Stage, index: int, gen: torch.Generator,
                 resume: TrainState | None = None) -> None:
    """Train ``head`` in place for one stage from step 0 (or from ``resume``'s step with its optimizer state),
    appending the logged records (loss, lr, held-out α per step and their mean) to ``run.history``. With
    ``cfg.patience`` the stage stops once held-out α stops improving (``EarlyStop``) and ends with its best head."""
    cfg, model, dist = run.cfg, run.model, run.dist
    stopper = EarlyStop.replay(cfg.patience, cfg.min_delta, cfg.min_steps,
                               stage_scores(run.history, stage.name) if resume else ())
    if stopper.active and stopper.best_step is not None and run.best is None:
        raise BebopError(f"the checkpoint in {Path(cfg.out) / CHECKPOINT_DIR} lacks the best head of its "
                         f"{stage.name} stage; remove it to start over")
    opt = torch.optim.AdamW(head.parameters(), lr=stage.lr, weight_decay=cfg.weight_decay)
    scaler = run.prec.grad_scaler()
    start = 0
    if resume is not None:
        start = resume.step
        if resume.optimizer is not None:
            opt.load_state_dict(resume.optimizer)
        if resume.scaler is not None:
            scaler.load_state_dict(resume.scaler)
    params = SamplingParams(temperature=cfg.temperature)
    head.train()
    with Progress(
        TextColumn(f"[bold]train-mtp {stage.loss} ({stage.name})"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"), TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
        disable=not dist.is_main,
    ) as progress:
        bar = progress.add_task("train", total=stage.steps, completed=start, loss=float("nan"))
        for step in range(start, stage.steps):
            t_step = time.perf_counter()
            lr = warmup_cosine(step, stage.steps, cfg.warmup, stage.lr, floor=0.0)
            for g in opt.param_groups:
                g["lr"] = lr
            # one global batch of world × batch_size rows, the same on every rank; each rank takes its slice
            idx = torch.randint(len(run.data), (dist.world * cfg.batch_size,), generator=gen).tolist()
            mine = idx[dist.rank * cfg.batch_size : (dist.rank + 1) * cfg.batch_size]
            loss, loss_value = _batch_loss(run, head, stage.loss, mine)
            if not math.isfinite(loss_value):   # the global batch's loss: the same value on every rank
                raise _non_finite(run, stage, step, f"{stage.loss} loss", loss_value)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            # after DDP's all-reduce every rank holds the same gradients, hence the same norm: all stop together.
            # Under float16 the gradient scaler skips steps with inf/NaN gradients itself.
            if not scaler.is_enabled() and not bool(torch.isfinite(gnorm)):
                raise _non_finite(run, stage, step, "gradient norm", float(gnorm))
            scaler.step(opt)
            scaler.update()
            run.step_seconds += time.perf_counter() - t_step
            progress.update(bar, completed=step + 1, loss=loss_value)
            if step % cfg.eval_every == 0 or step == stage.steps - 1:
                head.eval()
                alpha = expected_alpha(model, head, run.heldout, cfg.gamma_train, params, run.pad_id, dist=dist)
                head.train()
                score = heldout_score(alpha)
                if stopper.update(step, score) and stopper.active:
                    run.best = {k: v.detach().clone() for k, v in head.state_dict().items()}
                rec = {"stage": stage.name, "loss_name": stage.loss, "step": step, "loss": loss_value, "lr": lr,
                       "grad_norm": float(gnorm), "heldout_alpha": alpha, "heldout_alpha_mean": score,
                       "elapsed_s": time.perf_counter() - run.t0}
                run.history.append(rec)
                if run.log is not None:
                    run.log.write(json.dumps(rec) + "\n")
                    run.log.flush()
                if stopper.stop:
                    break
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < stage.steps:
                _checkpoint(run, head, opt, scaler, gen, index, step + 1)
    if run.best is not None:
        head.load_state_dict(run.best)
        run.best = None
    head.eval()


def _resume_point(cfg: TrainMTPConfig, dist: Dist) -> TrainState | None:
    """The run's checkpoint when it has one written with the same settings (every rank gets rank 0's). An unreadable
    checkpoint or other settings raise on every rank, so no rank is left waiting for the others."""
    state, error = None, None
    if dist.is_main:
        try:
            state = load_state(cfg.out)
            if state is not None:
                saved = {"patience": 0, "min_delta": 0.0, "min_steps": 0, **state.config}  # before early stopping
                check_resumable(saved, asdict(cfg), cfg.out)
                if cfg.patience and saved.get("eval_every") != cfg.eval_every:
                    raise BebopError(f"the checkpoint in {Path(cfg.out) / CHECKPOINT_DIR} was written with "
                                     f"eval_every {saved.get('eval_every')}; early stopping (patience "
                                     f"{cfg.patience}) decides at those evaluations, so rerun with the same "
                                     f"eval_every to resume")
        except BebopError as e:
            state, error = None, str(e)
    state, error = broadcast_object((state, error), dist)
    if error is not None:
        raise BebopError(error)
    return state


def _param_digest(head: MTPHead) -> str:
    """A hash of the head's parameters, to check that every rank ends with the same head."""
    h = hashlib.sha256()
    for name, t in sorted(head.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train_mtp(cfg: TrainMTPConfig) -> dict:
    """Train a head for the policy in ``cfg.model`` through ``cfg.stages()``; saves Bebop's layout to ``cfg.out``
    (and, for families without a native MTP layout, the Qwen3.5 and DeepSeek-V3 layouts beside it) with
    ``train_mtp.jsonl`` (per-stage records) and ``train_mtp_summary.json``. ``bebop export`` merges a head into
    a complete model directory in its family's native layout, for vLLM and SGLang.

    Precision (``bebop.models.device``): the frozen backbone is loaded in ``cfg.dtype`` on ``cfg.device`` and
    samples the data in it; the head keeps float32 weights and AdamW state, and its forwards and losses run
    under autocast in ``cfg.dtype`` (losses upcast logits to float32), so the saved head is float32.

    Under ``torchrun`` each process holds the frozen backbone on its own device and the head in DDP; sampling is
    sharded, each step's global batch is split over the ranks, and only rank 0 writes. With
    ``cfg.checkpoint_every`` the run saves ``out/checkpoint`` atomically and a rerun continues from it."""
    with process_group(cfg.device) as (dist, device):
        return _train_mtp(cfg, dist, device)


def _train_mtp(cfg: TrainMTPConfig, dist: Dist, device: torch.device) -> dict:
    resume = _resume_point(cfg, dist)  # before sampling: a checkpoint with other settings fails fast
    prec = precision(device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(cfg.model, device, prec.dtype)
    model.requires_grad_(False)
    data, heldout = training_rows(cfg, model, tokenizer, dist=dist)
    if not data or not heldout:
        raise BebopError(f"no usable training data: every policy sample has fewer than gamma_train + 1 = "
                         f"{cfg.gamma_train + 1} completion tokens (max_new_tokens={cfg.max_new_tokens})")
    if dist.world > len(data):
        raise BebopError(f"{dist.world} ranks but only {len(data)} usable training samples")
    head, start = initial_head(cfg.init, model, cfg.head_layers)
    head = head.to(device, torch.float32)
    stages = cfg.stages(warm=start == "fresh")
    gen = torch.Generator().manual_seed(cfg.seed)
    best = None
    if resume is not None:
        head.load_state_dict({k: v for k, v in resume.head.items() if not k.startswith(BEST)})
        best = {k.removeprefix(BEST): v.to(device) for k, v in resume.head.items() if k.startswith(BEST)} or None
        gen.set_state(resume.generator)
    unroll: torch.nn.Module = _Unroll(head)
    if dist.active:
        moe = any(".experts." in name for name, _ in head.named_parameters())  # not every expert runs each step
        unroll = torch.nn.parallel.DistributedDataParallel(
            unroll, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=moe)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    history = list(resume.history) if resume is not None else []
    log = None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "train_mtp.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        log = (out / "train_mtp.jsonl").open("a")
    try:
        run = _Run(cfg, model, tokenizer.pad_token_id, data, heldout, log, t0, prec, dist, unroll, history,
                   stages=tuple(stages), checkpoint=None if resume is None else (resume.stage, resume.step),
                   best=best)
        first = resume.stage if resume is not None else 0
        for i, stage in enumerate(stages):
            if i < first:
                continue
            _train_stage(run, head, stage, i, gen, resume if i == first else None)
            if i + 1 < len(stages):
                _checkpoint(run, head, None, None, gen, i + 1, 0)
    finally:
        if log is not None:
            log.close()
    digests = gather_objects(_param_digest(head), dist)
    if len(set(digests)) != 1:
        raise BebopError(f"ranks ended with different heads (parameter digests {digests})")
    outcomes = [stage_outcome(cfg, s, history) for s in stages]
    kept = history[-1]
    if cfg.patience and outcomes[-1]["best_step"] is not None:  # the head kept is the last stage's best
        kept = next(r for r in history if r["stage"] == stages[-1].name and r["step"] == outcomes[-1]["best_step"])
    summary = {"config": asdict(cfg), "init": start, "stages": [asdict(s) for s in stages],
               "heldout_alpha": kept["heldout_alpha"], "early_stop": outcomes, "curve": history,
               "train_seconds": time.perf_counter() - t0,
               "step_seconds": run.step_seconds, "resumed_from": None if resume is None else
               {"stage": resume.stage, "step": resume.step}, "world_size": dist.world, "rank_head_digests": digests,
               "data": {"source": cfg.source.kind, "label": cfg.source.label, "train_rows": len(data),
                        "heldout_rows": len(heldout)},
               "device": str(device), "dtype": prec.name, "backend": decoding_path(model).backend}
    if dist.is_main:
        save_head(head, out, model.config)
        if native_layout(model.config) is None:  # native families are served through `bebop export` instead
            if head.num_layers == 1:             # Qwen3.5's layout holds one fc / norm set: one MTP layer
                export_head(head, out / "qwen3_5_mtp.safetensors", "qwen3_5")
            export_head(head, out / "deepseek_v3_mtp.safetensors", "deepseek_v3",
                        num_base_layers=model.config.num_hidden_layers)
        atomic_write_text(out / "train_mtp_summary.json", json.dumps(summary, indent=2))
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # the finished head replaces it
    barrier(dist)
    return summary


def train_warm_head(cfg: TrainMTPConfig) -> dict:
    """Train only the warm stage of ``cfg`` (``warm_steps`` of ``warm_loss`` from the fresh head) into
    ``cfg.out``: the shared starting head when several losses are to be compared from one start. Same data,
    seed and steps as the warm stage inside ``train_mtp(cfg)``, so it is the same head."""
    return train_mtp(replace(cfg, loss=cfg.warm_loss, steps=cfg.warm_steps, lr=cfg.warm_lr, warm_steps=0, init=None))
