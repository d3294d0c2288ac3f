"""Supervised fine-tuning of a tiny policy from scratch on a task's varied reference solutions."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bebop.config import check_device, check_dtype, positive
from bebop.engine.forwards import decoding_path
from bebop.models.device import precision
from bebop.models.families import NATIVE_MTP_ARCHS, check_arch
from bebop.models.mtp import MTPHead
from bebop.models.native import save_model_with_head
from bebop.models.policy import ModelConfig, build_policy, save_policy
from bebop.models.tokenizer import build_tokenizer
from bebop.tasks import TASKS, Problem, Task, get_task


@dataclass(frozen=True)
class SFTRecipe:
    """Optimizer steps, sequences per step and peak learning rate of one task's default SFT run.

    Counted in steps, never in wall-clock time, so that the same command trains the same policy on any
    machine. Each recipe is sized to reach its task's target accuracy at τ = 1 (where it has one) with the default shape
    (see docs/benchmarks.md)."""

    steps: int
    batch_size: int = 64
    lr: float = 3e-3


# Per-task default recipes. The agent task needs about twice the steps: copying the looked-up item from the
# prompt is learned long after the tool-call format. The search task's sequences are ~40× longer (about 1,000
# tokens against ~25), so its steps take 16 sequences; its recipe is not yet sized against an accuracy target. The
# anagram task is sized for the demo's few-minute SFT budget (docs/tasks.md gives its accuracy and entropy).
SFT_RECIPES: dict[str, SFTRecipe] = {
    "arith": SFTRecipe(steps=1100),
    "countdown": SFTRecipe(steps=1100),
    "code": SFTRecipe(steps=1100),
    "agent": SFTRecipe(steps=2100),
    "search": SFTRecipe(steps=2000, batch_size=16),
    "anagram": SFTRecipe(steps=500),
}
DEFAULT_RECIPE = SFTRecipe(steps=1100)  # tasks registered without a recipe of their own


def sft_recipe(task: str) -> SFTRecipe:
    """The default recipe of ``task`` (``DEFAULT_RECIPE`` for tasks without one)."""
    return SFT_RECIPES.get(task, DEFAULT_RECIPE)


@dataclass
class SFTConfig:
    """One SFT run. ``steps``, ``batch_size`` and ``lr`` left as None take the task's recipe
    (``SFT_RECIPES``); ``max_minutes`` is an optional wall-clock cap, off by default, that only stops the
    loop early (the learning-rate schedule always follows steps). ``model.max_positions`` is widened to the task's
    ``context`` when the task declares one (``task_context``), so a long-completion task gets a policy that holds
    its references; every other task keeps the shape as given (256 positions by default)."""

    task: str = "arith"
    out: str = "runs/arith/base"
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    max_minutes: float | None = None
    eval_samples: int = 256           # quick evaluation after training (0 = skip)
    log_every: int = 10
    device: str = "auto"              # auto | cpu | cuda | cuda:i (auto: CUDA when available)
    dtype: str = "auto"               # compute dtype; weights and optimizer state stay float32 (models.device)
    arch: str = "qwen3"               # model family (bebop.models.families.ARCHS)
    mtp_weight: float = 0.3           # weight of the native MTP layer's loss (families that ship one)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        get_task(self.task)
        recipe = sft_recipe(self.task)
        self.steps = recipe.steps if self.steps is None else self.steps
        self.batch_size = recipe.batch_size if self.batch_size is None else self.batch_size
        self.lr = recipe.lr if self.lr is None else self.lr
        for name in ("steps", "batch_size", "lr", "log_every"):
            positive(name, getattr(self, name))
        if self.max_minutes is not None:
            positive("max_minutes", self.max_minutes)
        check_device(self.device)
        check_dtype(self.dtype)
        check_arch(self.arch)
        positive("mtp_weight", self.mtp_weight)
        self.model = self.model.with_context(task_context(self.task, self.model.max_positions))


def task_context(task: str, default: int) -> int:
    """Positions a policy for ``task`` needs: the task's ``context`` attribute, else ``default``."""
    return int(getattr(get_task(task), "context", default))


def task_corpus(n_per_task: int = 500, seed: int = 1234) -> list[str]:
    """Texts from every registered task, so one tokenizer covers the whole toy world. A task whose texts only
    reuse pieces the others hold (``in_tokenizer_corpus = False``, e.g. ``search``) is left out, so adding it
    leaves every token id, and so every other task's runs, unchanged."""
    rng = random.Random(seed)
    texts = []
    for task in TASKS.values():
        if not getattr(task, "in_tokenizer_corpus", True):
            continue
        for _ in range(n_per_task):
            prob = task.sample_problem(rng)
            texts.append(prob.prompt + task.reference_solution(prob, rng))
        texts.extend(getattr(task, "extra_texts", ()))  # e.g. environment messages no reference contains
    return texts


def encode_example(tokenizer, problem: Problem, completion: str) -> tuple[list[int], int]:
    """Token ids of BOS + prompt + completion + EOS, and the number of prompt tokens (BOS included)."""
    prompt_ids = tokenizer(problem.prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids + [tokenizer.eos_token_id], len(prompt_ids)


def completion_loss_mask(task: Task, tokenizer, completion: str) -> list[bool]:
    """Per completion token: True if the policy wrote it. Tasks with ``split_transcript`` (multi-turn tool
    use) mark their environment segments False; segments are tokenized one by one, which gives the same
    tokens as the whole text because segment boundaries fall on token boundaries."""
    split = getattr(task, "split_transcript", None)
    if split is None:
        return [True] * len(tokenizer(completion, add_special_tokens=False)["input_ids"])
    return [is_model for text, is_model in split(completion)
            for _ in tokenizer(text, add_special_tokens=False)["input_ids"]]


def sft_batch(task: Task, tokenizer, rng: random.Random, batch_size: int) -> dict[str, torch.Tensor]:
    """A right-padded batch with labels only on policy-written completion tokens and EOS (prompt, padding
    and environment tokens of multi-turn tasks are -100)."""
    rows = []
    for _ in range(batch_size):
        prob = task.sample_problem(rng)
        completion = task.reference_solution(prob, rng)
        row, n_prompt = encode_example(tokenizer, prob, completion)
        trained = [False] * n_prompt + completion_loss_mask(task, tokenizer, completion) + [True]
        if len(trained) != len(row):  # cannot happen with the project tokenizer; never mis-align labels
            trained = [False] * n_prompt + [True] * (len(row) - n_prompt)
        rows.append((row, trained))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, width), -100, dtype=torch.long)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    for i, (row, trained) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.where(torch.tensor(trained), torch.tensor(row), -100)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def warmup_cosine(step: int, total: int, warmup: int, peak: float, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``peak`` to ``floor × peak`` at step
    ``total``. A function of the step alone, so a run is the same on a fast and a slow machine."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def native_mtp_loss(model, head: MTPHead, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the native MTP layer's first step on the data (the objective DeepSeek-V3 and Qwen3.5
    pre-train their MTP layers with): at position t it reads x_{t+1} and h_t, and predicts x_{t+2}, scored only
    where the SFT loss scores x_{t+2}. ``hidden`` (the trunk's last hidden state) is detached, so the trunk
    learns from its own loss alone; the shared embedding and LM head get both gradients, as in pre-training."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    (h1,) = head.unroll(ids, hidden.detach(), 1, attention_mask=mask)
    logits = head.logits(h1[:, :-2])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, 2:].flatten(), ignore_index=-100)


def _sft_loss(model, head: MTPHead | None, batch: dict[str, torch.Tensor], mtp_weight: float) -> torch.Tensor:
    """The SFT loss, plus ``mtp_weight`` × the native MTP layer's loss when the family has one."""
    out = model(**batch, output_hidden_states=head is not None)
    if head is None:
        return out.loss
    return out.loss + mtp_weight * native_mtp_loss(model, head, out.hidden_states[-1], batch)


def save_trained(model, head: MTPHead | None, tokenizer, out: Path) -> None:
    """Families with native MTP are written as their released checkpoints are (sharded, with an index and the
    MTP layer in the family's own keys); the others as one safetensors file."""
    if head is None:
        save_policy(model, tokenizer, out)
    else:
        save_model_with_head(model, tokenizer, head.eval(), out, max_shard_size="2MB")


def train_sft(cfg: SFTConfig) -> dict:
    """Train a fresh policy on ``cfg.task`` on ``cfg.device``; saves model + tokenizer to ``cfg.out``; returns a
    summary. Under a lower ``cfg.dtype`` the weights and AdamW state stay float32 and each forward runs under
    autocast (``bebop.models.device``), so the saved checkpoint is float32 either way."""
    from bebop.training.evaluate import evaluate

    prec = precision(cfg.device, cfg.dtype)
    device = prec.device
    torch.manual_seed(cfg.seed)
    task = get_task(cfg.task)
    tokenizer = build_tokenizer(task_corpus())
    model = build_policy(cfg.model, tokenizer, cfg.arch).to(device)
    head = MTPHead.from_base(model).to(device) if cfg.arch in NATIVE_MTP_ARCHS else None
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    scaler = prec.grad_scaler()
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.name + ".sft.jsonl")
    t0 = time.perf_counter()
    step = 0
    with log_path.open("w") as log, Progress(
        TextColumn("[bold]sft {task.fields[name]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(),
    ) as progress:
        bar = progress.add_task("sft", total=cfg.steps, name=cfg.task, loss=float("nan"))
        model.train()
        for step in range(cfg.steps):
            batch = {k: v.to(device) for k, v in sft_batch(task, tokenizer, rng, cfg.batch_size).items()}
            lr = warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            with prec.autocast():
                loss = _sft_loss(model, head, batch, cfg.mtp_weight)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            elapsed = time.perf_counter() - t0
            out_of_time = cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60
            if step % cfg.log_every == 0 or step == cfg.steps - 1 or out_of_time:  # the last step is always logged
                rec = {"step": step, "loss": loss.item(), "lr": lr, "elapsed_s": elapsed}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                progress.update(bar, loss=rec["loss"])
            progress.update(bar, completed=step + 1)
            if out_of_time:
                break
    model.eval()
    train_seconds = time.perf_counter() - t0
    save_trained(model, head, tokenizer, out)
    summary = {"task": cfg.task, "arch": cfg.arch, "steps": step + 1, "train_seconds": train_seconds,
               "context": cfg.model.max_positions,
               "device": str(device), "dtype": prec.name, "config": asdict(cfg)}
    if cfg.eval_samples:
        summary["eval"] = evaluate(model, tokenizer, task, samples=cfg.eval_samples, temperature=1.0)
        summary["backend"] = decoding_path(model).backend
    (out / "sft_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
