"""GRPO with MTP-accelerated rollouts (DESIGN §5): the trainer loop.

Per RL step n: take the rollouts for step n (sampled by policy version v ≤ n, staleness n − v ≤ the bound),
compute group-normalised advantages, take one AdamW step of the clipped-ratio loss against the behaviour
log-probs, optionally re-train the MTP head on the fresh rollouts (online strategies), checkpoint.
Asynchronous mode keeps up to ``max_staleness`` future steps' rollouts in flight, so rollouts for step n+1
are sampled (by version n) while step n trains. The head and the policy have separate optimizers; policy
gradients never reach the head and head gradients never reach the policy (the policy is frozen while the
head trains, and the head is not in the policy loss).
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.live import Live
from rich.table import Table
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bebop.core.grpo import completion_logprobs, group_advantages, grpo_loss
from bebop.core.losses import mtp_loss_from_hidden
from bebop.errors import BebopError
from bebop.io import atomic_write, atomic_write_json, atomic_write_text, disk_full_is_clear
from bebop.models.checkpoint import load_head, save_head
from bebop.models.device import precision
from bebop.models.mtp import MTPHead
from bebop.models.policy import load_policy, save_policy
from bebop.rl.config import ONLINE_LOSS, RLConfig
from bebop.rl.data import UserPrompts, evaluate_rewards
from bebop.rl.rewards import Rewards, reward_means
from bebop.rl.rollout import (
    LocalBackend,
    RayBackend,
    RolloutBatch,
    load_prompts_for,
    snapshot,
)
from bebop.tasks import get_task
from bebop.training.evaluate import evaluate
from bebop.training.sft import warmup_cosine
from bebop.training.train_mtp import pad_batch, teacher_forced
from bebop.training.train_state import flatten_optimizer, unflatten_optimizer

# ---------------------------------------------------------------- checkpoints

CHECKPOINT = "checkpoint"              # RUN/checkpoint/: state.json + state-<step>.safetensors, no pickle
LEGACY_CHECKPOINT = "checkpoint.pt"    # the old pickle format: refused, converted only on request
STATE_JSON = "state.json"
FORMAT = "bebop-rl-checkpoint"
FORMAT_VERSION = 1
_OPTIMIZERS = ("opt", "head_opt")
_MODULES = ("policy", "head")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (a :meth:`Learner.checkpoint` dict) into the checkpoint directory ``path`` as ONE unit:
    its tensors (policy, head, both optimizers' tensors, RNG states) go to ``state-<step>.safetensors`` (temp
    file, fsync, rename), then ``state.json`` (everything else, and the tensor file's name, size and sha256) is
    renamed over the previous one: that rename is the commit. A crash or a full disk anywhere before it leaves
    the previous ``state.json`` and the tensor file it names untouched; tensor files no longer named are
    removed after the commit."""
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": state["step"],
                  "summary": state["summary"]}
    for name in _MODULES:
        if state.get(name) is not None:
            tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in state[name].items()})
        meta[name] = state.get(name) is not None
    for name in _OPTIMIZERS:
        meta[name] = None
        if state.get(name) is not None:
            opt_tensors, meta[name] = flatten_optimizer(state[name], f"{name}.")
            tensors.update(opt_tensors)
    tensors["rng.torch"] = state["torch_rng"].contiguous()
    tensors["rng.head_gen"] = state["head_gen"].contiguous()
    for i, t in enumerate(state.get("cuda_rng") or []):
        tensors[f"rng.cuda.{i}"] = t.contiguous()
    meta["cuda_rng"] = len(state.get("cuda_rng") or [])
    meta["py_rng"] = state["py_rng"]
    meta["np_rng"] = None
    if state.get("np_rng") is not None:
        kind, keys, pos, has_gauss, cached = state["np_rng"]
        tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        meta["np_rng"] = {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": cached}
    name = f"state-{state['step']:08d}.safetensors"
    if name == _committed_file(path):      # the same step saved again: never overwrite the committed file
        name = f"state-{state['step']:08d}.1.safetensors"
    atomic_write(path / name, lambda tmp: save_file(tensors, str(tmp)))
    try:
        meta["tensors"] = {"file": name, "bytes": (path / name).stat().st_size, "sha256": _sha256(path / name)}
        atomic_write_json(path / STATE_JSON, meta, indent=None)
    except Exception:               # not committed: the new tensor file is no checkpoint's (and frees the space)
        (path / name).unlink(missing_ok=True)
        raise
    for p in path.iterdir():   # superseded tensor files, temp files of a write that crashed
        if p.is_file() and p.name not in (name, STATE_JSON):
            p.unlink(missing_ok=True)


def _committed_file(path: Path) -> str | None:
    """The tensor file named by ``path``'s current ``state.json``, if any."""
    try:
        return json.loads((path / STATE_JSON).read_text())["tensors"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_checkpoint(path: Path) -> dict:
    """The :meth:`Learner.checkpoint` dict stored in checkpoint directory ``path`` (never unpickles anything);
    a missing, truncated or altered tensor file is a BebopError naming it."""
    where = path / STATE_JSON
    try:
        meta = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise BebopError(f"cannot resume: unreadable checkpoint {where}: {e}") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise BebopError(f"cannot resume: {where} is not a Bebop RL checkpoint of format version {FORMAT_VERSION} "
                         f"(format {meta.get('format')!r}, version {meta.get('format_version')!r})")
    info = meta["tensors"]
    file = path / info["file"]
    if not file.is_file() or file.stat().st_size != info["bytes"] or _sha256(file) != info["sha256"]:
        raise BebopError(f"cannot resume: checkpoint tensors {file} are missing or do not match the sha256 in "
                         f"{where}")
    try:
        tensors = load_file(str(file))
    except Exception as e:  # noqa: BLE001 - safetensors' own parse errors
        raise BebopError(f"cannot resume: corrupt checkpoint tensors {file}: {e}") from None
    state = {"step": meta["step"], "summary": meta["summary"], "torch_rng": tensors["rng.torch"],
             "head_gen": tensors["rng.head_gen"],
             "cuda_rng": [tensors[f"rng.cuda.{i}"] for i in range(meta["cuda_rng"])],
             "py_rng": (meta["py_rng"][0], tuple(meta["py_rng"][1]), meta["py_rng"][2])}
    for name in _MODULES:
        state[name] = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")} \
            if meta[name] else None
    for name in _OPTIMIZERS:
        state[name] = unflatten_optimizer(tensors, meta[name], f"{name}.") if meta[name] is not None else None
    state["np_rng"] = None
    if meta["np_rng"] is not None:
        r = meta["np_rng"]
        state["np_rng"] = (r["kind"], tensors["rng.numpy"].numpy().astype(np.uint32), r["pos"], r["has_gauss"],
                           r["cached_gaussian"])
    return state


def convert_legacy_checkpoint(out: Path) -> Path:
    """Rewrite ``out/checkpoint.pt`` (the old pickle format) as ``out/checkpoint/``. It is read with
    ``torch.load(weights_only=True)``, whose unpickler builds only tensors and plain containers and refuses any
    other object, so a crafted file cannot run code; the old file is left in place (never read again)."""
    legacy = out / LEGACY_CHECKPOINT
    if not legacy.is_file():
        raise BebopError(f"nothing to convert: no {LEGACY_CHECKPOINT} in {out}")
    if (out / CHECKPOINT / STATE_JSON).is_file():
        raise BebopError(f"will not convert {legacy}: {out / CHECKPOINT} already holds a checkpoint in the current "
                         f"format; resume without --convert-checkpoint")
    try:
        state = torch.load(legacy, map_location="cpu", weights_only=True)
        keys = {"step", "policy", "opt", "head", "head_opt", "head_gen", "torch_rng", "py_rng", "summary"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise ValueError(f"not an RL checkpoint (keys {sorted(state) if isinstance(state, dict) else state!r})")
    except pickle.UnpicklingError as e:   # the safe unpickler met an object it does not build: nothing ran
        why = next((ln.strip().removeprefix("WeightsUnpickler error: ").split(". ")[0] for ln in str(e).splitlines()
                    if "WeightsUnpickler error" in ln), str(e).splitlines()[0])
        raise BebopError(f"cannot convert {legacy}: it holds more than tensors and plain containers ({why}); "
                         f"refused without running it") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
        raise BebopError(f"cannot convert {legacy}: {str(e).splitlines()[0]}") from None
    save_checkpoint(out / CHECKPOINT, state)
    return out / CHECKPOINT


def load_checkpoint(out: Path) -> dict:
    """The checkpoint of run directory ``out``. Only ``out/checkpoint/`` is read (safetensors + JSON); a legacy
    pickle ``checkpoint.pt`` is refused without being opened, with how to convert it."""
    if (out / CHECKPOINT / STATE_JSON).is_file():
        return read_checkpoint(out / CHECKPOINT)
    if (out / LEGACY_CHECKPOINT).exists():
        raise BebopError(
            f"cannot resume: {out / LEGACY_CHECKPOINT} is in the old pickle format, which Bebop no longer loads "
            f"(unpickling a file can run arbitrary code); convert it with `bebop rl --resume {out} "
            f"--convert-checkpoint` (reads it with torch.load(weights_only=True): tensors and plain containers "
            f"only, never code), or start a new run in another --out")
    raise BebopError(f"cannot resume: no checkpoint in {out} (expected {out / CHECKPOINT / STATE_JSON})")


# ---------------------------------------------------------------- one RL step's pieces

class NonFiniteError(BebopError):
    """NaN or inf in a tensor of the update: raised before the optimizer step, so weights and checkpoint stay
    as they were."""


def check_rollouts(batch: RolloutBatch) -> None:
    """The behaviour log-probs handed back by the engine are finite (plain floats: no device sync)."""
    if not all(math.isfinite(x) for lp in batch.logprobs for x in lp) or not math.isfinite(batch.entropy_sum):
        raise NonFiniteError("non-finite rollout log-probs or entropy (the behaviour policy's logits)")


def training_batch(batch: RolloutBatch, pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Right-padded ``ids``, ``mask``, completion mask (policy-sampled tokens only) and behaviour log-probs
    aligned with ``ids[:, 1:]``."""
    rows = [(p + c, len(p)) for p, c in zip(batch.prompts, batch.completions, strict=True)]
    ids, mask, prompt_lens = pad_batch(rows, pad_id, device)
    pos = torch.arange(ids.shape[1], device=device)
    comp = ((pos[None, :] >= prompt_lens[:, None]) & (mask == 1)).long()
    if batch.sampled is not None:             # environment tokens: context for the policy, never a loss term
        for i, (m, (_, n_prompt)) in enumerate(zip(batch.sampled, rows, strict=True)):
            comp[i, n_prompt : n_prompt + len(m)] = torch.tensor(m, device=device)
    blp = torch.zeros(ids.shape[0], ids.shape[1] - 1, device=device)
    for i, (lp, (_, n_prompt)) in enumerate(zip(batch.logprobs, rows, strict=True)):
        blp[i, n_prompt - 1 : n_prompt - 1 + len(lp)] = torch.tensor(lp, device=device)
    return ids, mask, comp, blp


def policy_update(model: PreTrainedModel, ref_model: PreTrainedModel | None, opt: torch.optim.Optimizer,
                  batch: RolloutBatch, adv: torch.Tensor, cfg: RLConfig, pad_id: int) -> dict:
    """One optimizer step of the GRPO loss over the whole batch, accumulated over micro-batches."""
    device = next(model.parameters()).device
    prec = precision(device, cfg.dtype)
    ids, mask, comp, blp = training_batch(batch, pad_id, device)
    adv = adv.to(device)
    n = ids.shape[0]
    opt.zero_grad(set_to_none=True)
    stats = {"loss": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0, "kl": 0.0}
    bad_lp = torch.zeros((), dtype=torch.bool, device=device)     # device-side flags: no sync per micro-batch
    bad_loss = torch.zeros((), dtype=torch.bool, device=device)
    for i in range(0, n, cfg.micro_batch):
        sl = slice(i, i + cfg.micro_batch)
        with prec.autocast():  # float32 master weights, forwards in cfg.dtype (bebop.models.device)
            lp = completion_logprobs(model, ids[sl], mask[sl], comp[sl], cfg.temperature).float()
            ref_lp = None
            if ref_model is not None:
                with torch.no_grad():
                    ref_lp = completion_logprobs(ref_model, ids[sl], mask[sl], comp[sl], cfg.temperature).float()
        loss, st = grpo_loss(lp, blp[sl], adv[sl], comp[sl, 1:], cfg.clip_low, cfg.clip_high, cfg.kl_coef, ref_lp)
        bad_lp |= ~torch.isfinite(lp).all()
        bad_loss |= ~torch.isfinite(loss)
        w = lp.shape[0] / n
        (loss * w).backward()
        for k in stats:
            stats[k] += getattr(st, k) * w
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    flags = torch.stack([bad_lp, bad_loss, ~torch.isfinite(gnorm)]).tolist()   # one sync per optimizer step
    for bad, what in zip(flags, ("policy log-probs (the policy's logits)", "GRPO loss", "policy gradient norm"),
                         strict=True):
        if bad:
            opt.zero_grad(set_to_none=True)
            raise NonFiniteError(f"non-finite {what} in the policy update; the optimizer step was not taken")
    stats["grad_norm"] = float(gnorm)
    opt.step()
    return stats


def head_update(model: PreTrainedModel, head: MTPHead, opt: torch.optim.Optimizer, batch: RolloutBatch,
                cfg: RLConfig, pad_id: int, gen: torch.Generator) -> float:
    """Re-train the head on fresh rollouts towards the current policy (online strategies). The policy is
    frozen meanwhile, so no head gradient reaches it; returns the last loss."""
    device = next(model.parameters()).device
    prec = precision(device, cfg.dtype)
    rows = [(p + c, len(p)) for p, c in zip(batch.prompts, batch.completions, strict=True)]
    rows = [r for r in rows if len(r[0]) > cfg.online_gamma_train + 1]
    loss_name = ONLINE_LOSS[cfg.mtp_strategy]
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    head.train()
    last = float("nan")
    try:
        for _ in range(cfg.online_steps):
            idx = torch.randint(len(rows), (min(32, len(rows)),), generator=gen).tolist()
            ids, mask, pl = pad_batch([rows[i] for i in idx], pad_id, device)
            with prec.autocast():
                hq, hp, y = teacher_forced(model, head, ids, mask, pl, cfg.online_gamma_train)
                w = model.get_output_embeddings().weight   # hidden states meet the LM head in its own dtype
                loss = mtp_loss_from_hidden(loss_name, hq.to(w.dtype), hp.to(w.dtype), w, cfg.temperature, y,
                                            torch.ones(len(y), device=device))
            last = loss.item()
            if not math.isfinite(last):
                raise NonFiniteError(f"non-finite MTP head loss ({last}) in the online head re-training; the head's "
                                     f"optimizer step was not taken")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.online_grad_clip)
            opt.step()
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        head.eval()
    return last


def step_record(step: int, batch: RolloutBatch, cfg: RLConfig) -> dict:
    """Rollout-side metrics of one RL step."""
    tokens = batch.num_tokens
    m = batch.metrics
    rec = {
        "step": step, "version": batch.version, "staleness": step - batch.version,
        "reward": sum(batch.rewards) / len(batch.rewards),
        **({} if cfg.user_prompts else {"accuracy": sum(r >= 1.0 for r in batch.rewards) / len(batch.rewards)}),
        "entropy": batch.entropy_sum / max(tokens, 1),
        "mean_tokens": tokens / len(batch.completions),
        "rollout_tokens": tokens, "rollout_s": batch.seconds,
        "rollout_tokens_per_s": tokens / batch.seconds if batch.seconds > 0 else 0.0,
    }
    if batch.reward_parts is not None:      # each --reward function's mean (rows where it returned None left out)
        rec.update(reward_means(batch.reward_parts))
    if batch.retries:      # a Ray worker died mid-step and its shard was re-run on a fresh one
        rec["rollout_retries"] = batch.retries
    if cfg.use_mtp:
        rec.update(alpha=m.alpha, expected_alpha=m.expected_alpha, accept_length=m.accept_length,
                   target_forwards=m.target_forwards, draft_forwards=m.draft_forwards)
    return rec


LIVE_COLUMNS = ("step", "reward", "accuracy", "entropy", "accept_length", "rollout_tokens_per_s", "rollout_s",
                "train_s", "step_s", "staleness")


def live_table(rows: list[dict], title: str) -> Table:
    """The last dozen step records as the live terminal table."""
    table = Table(title=title)
    for c in LIVE_COLUMNS:
        table.add_column(c, justify="right")
    for r in rows[-12:]:
        table.add_row(*[f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in LIVE_COLUMNS])
    return table


# ---------------------------------------------------------------- the run's state

@dataclass
class Learner:
    """The trainer's side of an RL run: the policy being optimised, its frozen reference (KL term, optional),
    the MTP head with its own optimizer (online strategies only) and the generator of head-training batches.
    The two optimizers are separate so that policy and head gradients never mix."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    opt: torch.optim.Optimizer
    head: MTPHead | None = None
    head_opt: torch.optim.Optimizer | None = None
    ref_model: PreTrainedModel | None = None
    head_gen: torch.Generator = field(default_factory=torch.Generator)

    @classmethod
    def build(cls, cfg: RLConfig) -> Learner:
        """Fresh state from ``cfg.model`` (and ``cfg.mtp``), torch and Python RNGs seeded by ``cfg.seed``."""
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        model, tokenizer = load_policy(cfg.model, cfg.device, "float32")  # trained: float32 master weights
        head = None
        if cfg.use_mtp:
            head = (load_head(cfg.mtp, model) if cfg.mtp else MTPHead.from_base(model)).to(cfg.device).eval()
        ref_model = load_policy(cfg.model, cfg.device, cfg.dtype)[0].requires_grad_(False) if cfg.kl_coef else None
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
        head_opt = torch.optim.AdamW(head.parameters(), lr=cfg.online_lr) if cfg.mtp_strategy in ONLINE_LOSS \
            else None
        return cls(model, tokenizer, opt, head, head_opt, ref_model, torch.Generator().manual_seed(cfg.seed + 17))

    def checkpoint(self, step: int, summary: dict) -> dict:
        """Everything a resumed run needs to continue at ``step`` exactly as the uninterrupted run would."""
        return {
            "step": step, "policy": snapshot(self.model), "opt": self.opt.state_dict(),
            "head": snapshot(self.head), "head_opt": self.head_opt.state_dict() if self.head_opt else None,
            "head_gen": self.head_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "py_rng": random.getstate(), "np_rng": np.random.get_state(), "summary": summary,
        }

    def restore(self, ck: dict) -> None:
        """Load a ``checkpoint`` dict back into this state and the global RNGs."""
        self.model.load_state_dict(ck["policy"])
        self.opt.load_state_dict(ck["opt"])
        if self.head is not None and ck.get("head") is not None:
            self.head.load_state_dict(ck["head"])
        if self.head_opt is not None and ck.get("head_opt") is not None:
            self.head_opt.load_state_dict(ck["head_opt"])
        self.head_gen.set_state(ck["head_gen"])
        torch.set_rng_state(ck["torch_rng"])
        if ck.get("cuda_rng") and torch.cuda.is_available():
            n = min(len(ck["cuda_rng"]), torch.cuda.device_count())
            torch.cuda.set_rng_state_all(ck["cuda_rng"][:n])
        random.setstate(ck["py_rng"])
        if ck.get("np_rng") is not None:     # absent from converted legacy checkpoints
            np.random.set_state(ck["np_rng"])


def resume_from(out: Path, learner: Learner, ck: dict | None = None) -> tuple[int, dict]:
    """Restore ``learner`` from ``out``'s checkpoint (``ck`` when already read) and drop log lines of steps after
    it (a crash between a step's log line and the next checkpoint would otherwise repeat them); returns (next
    step, summary)."""
    ck = load_checkpoint(out) if ck is None else ck
    learner.restore(ck)
    start = ck["step"]
    log_path = out / "rl.jsonl"
    if log_path.exists():
        keep = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] < start]
        atomic_write_text(log_path, "".join(ln + "\n" for ln in keep))
    log_event(out, {"event": "resumed", "step": start})
    return start, ck["summary"]


EVENTS = "events.jsonl"


def log_event(out: Path, event: dict) -> None:
    """Append ``event`` to ``RUN/events.jsonl``, the run's record of faults and resumes (``rl.jsonl`` keeps one
    record per step). Best effort: a full disk must not hide the error being reported."""
    try:
        with (out / EVENTS).open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")
    except OSError:
        pass


def stopped(e: BebopError, step: int, checkpoint_step: int | None, out: Path) -> BebopError:
    """The one error a run stops with at ``step`` (logged to ``events.jsonl``), saying what survives."""
    if checkpoint_step is None:
        hint = "no checkpoint was written yet: rerun from the start"
    else:
        hint = (f"the last checkpoint (step {checkpoint_step}) in {out / CHECKPOINT} is intact: continue with "
                f"`bebop rl --resume {out}`")
    log_event(out, {"event": "stopped", "step": step, "error": str(e), "checkpoint_step": checkpoint_step})
    return type(e)(f"RL step {step}: {e}; the run stopped, {hint}")


def make_backend(cfg: RLConfig, data: UserPrompts | None = None) -> LocalBackend | RayBackend:
    """Ray actors for ``--backend ray``; otherwise in-process, on a background thread when asynchronous. ``data``:
    the user's prompts, already loaded (handed to every worker)."""
    if cfg.backend == "ray":
        return RayBackend(cfg, workers=cfg.ray_workers, address=cfg.ray_address, data=data)
    return LocalBackend(cfg, threaded=cfg.async_rollouts, data=data)


# ---------------------------------------------------------------- the loop

def train_step(cfg: RLConfig, learner: Learner, step: int, batch: RolloutBatch) -> dict:
    """The learning side of RL step ``step``: warmup-cosine learning rate, group-normalised advantages, one
    GRPO policy step, then (online strategies, every ``online_every`` steps) a head re-training on the same
    rollouts. Returns the step's training metrics."""
    t_train = time.perf_counter()
    lr = warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr, floor=1.0)
    for g in learner.opt.param_groups:
        g["lr"] = lr
    adv = group_advantages(torch.tensor(batch.rewards), cfg.group_size)
    pad_id = learner.tokenizer.pad_token_id
    rec = {**policy_update(learner.model, learner.ref_model, learner.opt, batch, adv, cfg, pad_id), "lr": lr}
    rec["train_s"] = time.perf_counter() - t_train
    if learner.head_opt is not None and (step + 1) % cfg.online_every == 0:
        t_head = time.perf_counter()
        rec["head_loss"] = head_update(learner.model, learner.head, learner.head_opt, batch, cfg, pad_id,
                                       learner.head_gen)
        rec["head_update_s"] = time.perf_counter() - t_head
    return rec


class RolloutQueue:
    """Rollouts in flight, oldest first. Before step n trains, rollouts for every step up to n + bound are
    submitted, each sampled by the weights current at submission (policy version n), so step n's rollouts
    come from a version at most ``bound`` steps old."""

    def __init__(self, cfg: RLConfig, backend: LocalBackend | RayBackend, start: int) -> None:
        self.cfg, self.backend, self.next_step = cfg, backend, start
        self.inflight: deque = deque()

    def take(self, step: int, learner: Learner) -> tuple[RolloutBatch, float]:
        """Top up the queue with the current weights, then wait for step ``step``'s rollouts: (batch, wait s)."""
        while self.next_step <= min(step + self.cfg.staleness_bound, self.cfg.steps - 1):
            self.inflight.append(self.backend.submit(self.next_step, step, snapshot(learner.model),
                                                     snapshot(learner.head)))
            self.next_step += 1
        t_wait = time.perf_counter()
        batch = self.inflight.popleft().result()
        return batch, time.perf_counter() - t_wait


def run_steps(cfg: RLConfig, learner: Learner, start: int, summary: dict, console: Console,
              data: UserPrompts | None = None) -> list[dict]:
    """RL steps ``start``..``cfg.steps - 1``: each takes its rollouts, trains, checkpoints every
    ``checkpoint_every`` steps (and after the last) and appends its record to ``rl.jsonl``. The record is
    written before the checkpoint: a crash between the two leaves a line that resuming drops and redoes,
    never a checkpointed step without its line. Returns the records of the whole run."""
    out = Path(cfg.out)
    log_path = out / "rl.jsonl"
    rows = [json.loads(ln) for ln in log_path.read_text().splitlines()] if log_path.exists() else []
    title = f"bebop rl {cfg.label} · {cfg.mtp_strategy}"
    checkpoint_step = start if (out / CHECKPOINT / STATE_JSON).is_file() else None
    backend = make_backend(cfg, data)
    queue = RolloutQueue(cfg, backend, start)
    t_prev = time.perf_counter()
    step = start
    try:
        with log_path.open("a") as log, Live(live_table(rows, title), console=console, refresh_per_second=2) as live:
            for step in range(start, cfg.steps):
                batch, wait_s = queue.take(step, learner)
                check_rollouts(batch)
                for r in batch.retries:
                    log_event(out, {"event": "rollout_retry", "step": step, **r})
                rec = {**step_record(step, batch, cfg), "wait_s": wait_s, **train_step(cfg, learner, step, batch)}
                now = time.perf_counter()
                rec["step_s"], t_prev = now - t_prev, now
                with disk_full_is_clear(log_path):
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1:
                    save_checkpoint(out / CHECKPOINT, learner.checkpoint(step + 1, summary))
                    checkpoint_step = step + 1
                rows.append(rec)
                live.update(live_table(rows, title))
        console.print()
    except BebopError as e:    # a non-finite update, a full disk, rollout workers lost for good
        raise stopped(e, step, checkpoint_step, out) from e
    finally:
        backend.close()
    return rows


def train_rl(cfg: RLConfig, resume: bool = False, console: Console | None = None, convert: bool = False) -> dict:
    """Run GRPO; writes ``rl.jsonl`` (one record per step), ``checkpoint/`` every ``checkpoint_every`` steps,
    ``events.jsonl`` (faults and resumes), and at the end ``policy/`` (+ ``mtp/``) and ``rl_summary.json`` into
    ``cfg.out``. When ``eval_samples`` > 0 the policy is evaluated before (not on resume) and after RL: a task's
    held-out accuracy, or for a user's prompts the mean reward on the held-out prompts (:func:`held_out_eval`).
    ``convert`` (with ``resume``): first rewrite a legacy pickle ``checkpoint.pt`` in the current format."""
    console = console or Console()
    out = Path(cfg.out)
    ck = None
    if resume:   # before any model is loaded: a missing or refused checkpoint fails at once
        if convert:
            console.print(f"converted {out / LEGACY_CHECKPOINT} to {convert_legacy_checkpoint(out)}")
        ck = load_checkpoint(out)
    learner = Learner.build(cfg)
    data = None
    if cfg.user_prompts:   # read and checked before the run directory is touched: a bad file writes nothing
        data = load_prompts_for(cfg, learner.tokenizer, learner.model)
        if data.skipped:
            console.print(f"[yellow]skipped {data.skipped} of {data.skipped + len(data.ids)} prompts from "
                          f"{data.label}: longer than the policy's context leaves room for with max_new_tokens "
                          f"{cfg.max_new_tokens}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "rl_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    summary: dict = {"config": asdict(cfg)}
    start = 0
    if ck is not None:
        start, summary = resume_from(out, learner, ck)
        console.print(f"resuming {out} at step {start}")
    else:             # a new run in this directory: the previous run's log and checkpoint go
        (out / "rl.jsonl").unlink(missing_ok=True)
        (out / EVENTS).unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
        if cfg.eval_samples:
            summary["eval_before"] = held_out_eval(cfg, learner, data, "before")
    learner.model.train()
    rows = run_steps(cfg, learner, start, summary, console, data)
    learner.model.eval()
    save_policy(learner.model, learner.tokenizer, out / "policy")
    if learner.head is not None:
        save_head(learner.head, out / "mtp", learner.model.config)
    if cfg.eval_samples:
        summary["eval_after"] = held_out_eval(cfg, learner, data, "after")
    summary.update(rl_summary(rows))
    (out / "rl_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def held_out_eval(cfg: RLConfig, learner: Learner, data: UserPrompts | None, when: str) -> dict:
    """The evaluation ``when`` ("before" / "after") RL: for a task, its accuracy on ``eval_samples`` fresh problems
    (:func:`bebop.training.evaluate.evaluate`); for a user's prompts, the mean reward (weighted total and each
    function's) of ``eval_samples`` plain samples at the rollout temperature over the held-out prompts, the same
    prompts and sampling seed before and after."""
    if data is None:
        return evaluate(learner.model, learner.tokenizer, get_task(cfg.task), samples=cfg.eval_samples,
                        temperature=cfg.temperature)
    try:
        return evaluate_rewards(learner.model, learner.tokenizer, data, Rewards(cfg.reward, cfg.reward_weights),
                                cfg.eval_samples, cfg.temperature, cfg.max_new_tokens, cfg.seed)
    except BebopError as e:
        raise type(e)(f"held-out evaluation {when} RL: {e}") from e


def rl_summary(rows: list[dict]) -> dict:
    """Means over the run of the timing figures, and first/last accept length (for the drift check)."""
    if not rows:
        return {}
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("step_s", "rollout_s", "train_s", "reward",
                                                               "entropy", "rollout_tokens_per_s")}
    out = {"steps_run": len(rows), **{f"mean_{k}": v for k, v in mean.items()}}
    if "accept_length" in rows[0]:
        out["accept_length_first"] = rows[0]["accept_length"]
        out["accept_length_last"] = rows[-1]["accept_length"]
    return out
