"""TRL's ``GRPOTrainer`` — generating with its built-in ``model.generate``, with Bebop's plain decoding, and with
Bebop's MTP-RS (γ = 3) through ``bebop.integrations.trl`` — and ``bebop rl``, on the same policy, task, prompts and
settings, side by side in one run.

    python benchmarks/trl_grpo.py --model runs/arith/base --mtp runs/arith/mtp_e2e_tv --threads 1

One RL step on every side = 8 prompts × 8 completions sampled at τ = 1 (≤ 96 new tokens), rewarded by
``task.reward``, then ONE AdamW step (lr 2e-4, betas 0.9/0.99, no weight decay, grad clip 1.0) on the
clipped-ratio GRPO loss (ε = 0.2, group-std-normalised advantages, per-sequence token mean, no KL), fp32, CPU,
forward/backward in micro-batches of 64 rows, 10 steps. Step s uses the same problems on every side
(``sample_problems(task, prompts, step_seed(seed, s))``, as bebop's rollout worker draws them). "rollout s" is
generation alone for bebop rl and the Bebop rollout functions, generation + reward scoring for TRL's built-in path.

TRL batch arithmetic (trl 1.16): ``per_device_train_batch_size`` counts completions, generation happens once per
``steps_per_generation`` micro-steps (default = ``gradient_accumulation_steps``) for ``generation_batch_size =
per_device_train_batch_size × steps_per_generation`` completions. So per_device 64 × grad-accum 1 → one generation
of 64 = 8 × 8 completions per optimizer step, and (grad-accum a multiple of steps_per_generation, one iteration)
no extra "old log-prob" forward. TRL's step is timed from ``on_step_begin`` to ``on_step_end``: it contains
generation (``model.generate``), reward scoring, both forward/backward micro-batches and the optimizer step.
Bebop's ``step_s`` (from ``rl.jsonl``) is rollout + update wall time. Both means skip the first step (warm-up).
"CPU s/step" is process CPU time per step (bebop: between the ends of consecutive policy updates), less
sensitive than wall time to other jobs on the machine. On a busy shared box prefer ``--threads 1``: two OpenMP
threads time-sliced against other jobs made steps swing 5–50 s, single-threaded ones ran at 1.1–3 s.

trl is not a bebop dependency: it is imported lazily; if it is missing or cannot run, the reason goes into
the JSON instead of a crash. Prints a rich table and writes ``--json`` (default runs/bench_trl_grpo.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # no hub look-ups (offline machine)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import bebop.rl.trainer  # noqa: E402
from bebop.models.policy import load_policy  # noqa: E402
from bebop.rl.config import RLConfig  # noqa: E402
from bebop.rl.rollout import step_seed  # noqa: E402
from bebop.rl.trainer import train_rl  # noqa: E402
from bebop.tasks import get_task, sample_problems  # noqa: E402

MICRO_BATCH = 64   # bebop's RLConfig.micro_batch default; TRL's per_device_train_batch_size


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def timed(xs: list[float]) -> list[float]:
    """Step times without the first (warm-up) step."""
    return xs[1:] if len(xs) > 1 else xs


# ---------------------------------------------------------------- bebop

def run_bebop(args, strategy: str, out: Path) -> dict:
    cfg = RLConfig(task=args.task, model=args.model, mtp=args.mtp if strategy == "frozen" else None,
                   mtp_strategy=strategy, steps=args.steps, prompts_per_step=args.prompts, group_size=args.group,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, lr=args.lr,
                   micro_batch=MICRO_BATCH, eval_samples=0, checkpoint_every=args.steps, seed=args.seed,
                   out=str(out))
    # CPU seconds per step (robust to other jobs on the machine): process_time at the end of each step's
    # policy update; consecutive differences span one whole step (rollout n + update n), steps 1..N-1.
    marks: list[float] = []
    policy_update = bebop.rl.trainer.policy_update

    def marked_update(*a, **k):
        stats = policy_update(*a, **k)
        marks.append(time.process_time())
        return stats

    bebop.rl.trainer.policy_update = marked_update
    load = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        train_rl(cfg, console=Console(quiet=True))
    finally:
        bebop.rl.trainer.policy_update = policy_update
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    step_cpu = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    rows = [json.loads(ln) for ln in (out / "rl.jsonl").read_text().splitlines() if ln]
    step_s = [r["step_s"] for r in rows]
    res = {
        "mtp_strategy": strategy, "mtp": cfg.mtp, "rule": cfg.rule if cfg.use_mtp else None,
        "step_s": step_s, "mean_step_s": mean(timed(step_s)),
        "rollout_s": [r["rollout_s"] for r in rows], "train_s": [r["train_s"] for r in rows],
        "mean_rollout_s": mean(timed([r["rollout_s"] for r in rows])),
        "mean_train_s": mean(timed([r["train_s"] for r in rows])),
        "reward": [r["reward"] for r in rows], "mean_tokens": [r["mean_tokens"] for r in rows],
        "step_cpu_s": step_cpu, "mean_step_cpu_s": mean(step_cpu),
        "wall_s": wall, "cpu_s": cpu, "loadavg_at_start": load,
    }
    if cfg.use_mtp:
        res["accept_length"] = [r.get("accept_length") for r in rows]
    return res


# ---------------------------------------------------------------- TRL

ROLLOUTS = {"generate": "transformers model.generate (TRL's built-in; no vLLM, no paged/continuous)",
            "bebop-plain": "bebop.integrations.trl rollout_func, Bebop plain decoding",
            "bebop-mtp": "bebop.integrations.trl rollout_func, Bebop MTP-RS at γ = 3 with --mtp"}


def run_trl(args, out: Path, rollout: str = "generate") -> dict:
    """Time ``GRPOTrainer`` for ``args.steps`` optimizer steps with generation by ``rollout`` (:data:`ROLLOUTS`);
    returns figures or ``{"error": why}``."""
    try:
        import datasets
        import trl
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        return {"error": f"trl is not installed ({e}); `pip install trl` to run this comparison"}

    task = get_task(args.task)
    model, tokenizer = load_policy(args.model, "cpu", torch.float32)

    # Step s gets bebop's step-s problems: 16 problems per step, dataset in order, no shuffling. The reward
    # function finds each completion's Problem through the extra `problem_idx` column.
    problems = [p for s in range(args.steps) for p in sample_problems(task, args.prompts, step_seed(args.seed, s))]
    dataset = datasets.Dataset.from_dict({"prompt": [p.prompt for p in problems],
                                          "problem_idx": list(range(len(problems)))})
    rewards_per_step: list[list[float]] = []
    tokens_per_step: list[float] = []
    problems_per_step: list[list[int]] = []   # [first, last] problem index rewarded at each step

    def arith_reward(prompts, completions, completion_ids, problem_idx, **kwargs) -> list[float]:
        rs = [float(task.reward(problems[i], c)) for i, c in zip(problem_idx, completions, strict=True)]
        rewards_per_step.append(rs)
        tokens_per_step.append(mean([len(c) for c in completion_ids]))
        problems_per_step.append([min(problem_idx), max(problem_idx)])
        return rs

    # TRL tokenises text prompts with `processing_class(text=prompts)`; bebop with `tokenizer(prompt)`. Both
    # must start with BOS (added by the tokenizer's template), else TRL would roll out off-distribution.
    bebop_ids = [tokenizer(p.prompt)["input_ids"] for p in problems[: args.prompts]]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []   # wall seconds per optimizer step
            self.cpu: list[float] = []     # process CPU seconds per optimizer step
            self._t = self._c = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t)
            self.cpu.append(time.process_time() - self._c)

    timer = StepTimer()
    config = GRPOConfig(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=args.prompts * args.group // MICRO_BATCH,   # → generation_batch_size P × G
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=RLConfig.warmup,
        adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, max_grad_norm=RLConfig.grad_clip,
        beta=0.0, epsilon=RLConfig.clip_low, epsilon_high=RLConfig.clip_high,
        loss_type="grpo", scale_rewards="group", num_iterations=1,
        shuffle_dataset=False, seed=args.seed,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
    )
    res: dict = {
        "trl_config": {k: getattr(config, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size",
            "steps_per_generation", "num_generations", "max_completion_length", "loss_type", "beta",
            "gradient_checkpointing", "bf16", "use_vllm", "use_transformers_continuous_batching")},
    }
    rollout_func = None
    if rollout != "generate":
        from bebop.integrations.trl import BebopRollout

        rollout_func = BebopRollout(args.mtp if rollout == "bebop-mtp" else None, gamma=3, seed=args.seed)
    try:
        trainer = GRPOTrainer(model=model, reward_funcs=arith_reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer], rollout_func=rollout_func)
        trl_ids, _, _ = trainer._tokenize_prompts([p.prompt for p in problems[: args.prompts]])
        res["prompt_ids_match_bebop"] = [list(x) for x in trl_ids] == bebop_ids
        res["prompt_starts_with_bos"] = all(x[0] == tokenizer.bos_token_id for x in trl_ids)
        res["eos_token_ids"] = list(trainer.eos_token_ids)
        res["pad_token_id"] = tokenizer.pad_token_id
        gen_s: list[float] = []
        generate_and_score = trainer._generate_and_score_completions

        def timed_generate(*a, **k):   # generation + reward + advantages, once per optimizer step
            t = time.perf_counter()
            r = generate_and_score(*a, **k)
            gen_s.append(time.perf_counter() - t)
            return r

        trainer._generate_and_score_completions = timed_generate
        res["loadavg_at_start"] = os.getloadavg()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        res["wall_s"], res["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    except Exception as e:  # noqa: BLE001 - record why TRL could not run instead of crashing the benchmark
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc(limit=8)
        return res
    res.update(
        trl_version=trl.__version__, generation_path=ROLLOUTS[rollout],
        step_s=timer.times, mean_step_s=mean(timed(timer.times)),
        step_cpu_s=timer.cpu, mean_step_cpu_s=mean(timed(timer.cpu)),
        generate_and_score_s=gen_s, mean_generate_and_score_s=mean(timed(gen_s)),
        reward=[mean(r) for r in rewards_per_step], mean_tokens=tokens_per_step,
        completions_per_step=[len(r) for r in rewards_per_step], problems_per_step=problems_per_step,
    )
    if rollout_func is not None:
        hist = rollout_func.history
        res["rollout_s"] = [h["rollout_s"] for h in hist]
        res["mean_rollout_s"] = mean(timed(res["rollout_s"]))
        if rollout == "bebop-mtp":
            res["accept_length"] = [h["accept_length"] for h in hist]
    if len(timer.times) != args.steps:
        res["error"] = f"expected {args.steps} optimizer steps, timed {len(timer.times)}"
    return res


# ---------------------------------------------------------------- main

def bebop_source() -> dict:
    """Which bebop code ran: its path, and the git commit + uncommitted changes under it (when in a repo)."""
    import subprocess

    import bebop

    src = Path(bebop.__file__).resolve().parent
    info: dict = {"path": str(src)}
    try:
        git = ["git", "-C", str(src)]
        info["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
        info["uncommitted"] = subprocess.run([*git, "status", "--porcelain", "."], capture_output=True,
                                             text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/arith/base")
    ap.add_argument("--mtp", default=None, help="MTP head dir: also time bebop with mtp_strategy=frozen")
    ap.add_argument("--task", default="arith")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (TRL num_generations)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads for all runs (0 = default)")
    ap.add_argument("--json", default="runs/bench_trl_grpo.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 2 or (args.prompts * args.group) % MICRO_BATCH:
        ap.error(f"need --steps >= 2 and prompts × group a multiple of {MICRO_BATCH}")
    console = Console(width=max(Console().width, 150))
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_trl_grpo_") as tmp:
        runs = [("bebop (none)", "none")] + ([("bebop (MTP-RS, frozen)", "frozen")] if args.mtp else [])
        for name, strategy in runs:
            console.print(f"[bold]{name}[/]: {args.steps} GRPO steps …")
            results[name] = run_bebop(args, strategy, Path(tmp) / strategy)
        for rollout in ("generate", "bebop-plain", "bebop-mtp")[: 3 if args.mtp else 2]:
            name = "TRL GRPOTrainer" + ("" if rollout == "generate" else f" + {rollout}")
            console.print(f"[bold]{name}[/]: {args.steps} GRPO steps …")
            results[name] = run_trl(args, Path(tmp) / f"trl_{rollout}", rollout)

    trl, trl_mean, trl_cpu = results["TRL GRPOTrainer"], None, None
    if "mean_step_s" in trl:
        trl_mean, trl_cpu = trl["mean_step_s"], trl["mean_step_cpu_s"]
    table = Table(title=f"GRPO step time, {args.task}: {args.prompts} prompts × {args.group}, ≤ {args.max_new_tokens} "
                        f"tokens, τ={args.temperature}, {args.steps} steps (first skipped), "
                        f"{torch.get_num_threads()} torch threads")
    for c in ("framework", "mean step s", "min step s", "steps/s", "rollout s", "CPU s/step", "reward",
              "last reward", "accept len", "ratio vs TRL", "CPU ratio vs TRL"):
        table.add_column(c, justify="right")
    for name, r in results.items():
        if "mean_step_s" not in r:
            table.add_row(name, *["-"] * 8, f"failed: {r.get('error', '?')[:60]}", "-")
            continue
        r["steps_per_s"] = 1.0 / r["mean_step_s"]
        r["min_step_s"] = min(timed(r["step_s"]))
        if trl_mean:
            r["speedup_vs_trl"] = trl_mean / r["mean_step_s"]
            r["cpu_speedup_vs_trl"] = trl_cpu / r["mean_step_cpu_s"]
        rollout = r.get("mean_rollout_s", r.get("mean_generate_and_score_s"))
        acc = r.get("accept_length")
        acc = [a for a in acc if a is not None] if acc else None
        table.add_row(name, f"{r['mean_step_s']:.2f}", f"{r['min_step_s']:.2f}", f"{r['steps_per_s']:.3f}",
                      f"{rollout:.2f}", f"{r['mean_step_cpu_s']:.2f}", f"{mean(r['reward']):.3f}",
                      f"{r['reward'][-1]:.3f}", f"{mean(acc):.2f}" if acc else "-",
                      f"{r['speedup_vs_trl']:.2f}×" if trl_mean else "-",
                      f"{r['cpu_speedup_vs_trl']:.2f}×" if trl_mean else "-")
    console.print(table)
    for name, r in results.items():
        if name.startswith("TRL") and "error" in r:
            console.print(f"[red]{name} did not run:[/] {r['error']}")

    settings = {k: v for k, v in vars(args).items() if k != "json"}
    settings.update(bebop_source=bebop_source(), micro_batch=MICRO_BATCH, optimizer_steps_per_batch=1, kl=0.0,
                    dtype="float32", device="cpu",
                    clip=RLConfig.clip_low, grad_clip=RLConfig.grad_clip, warmup=RLConfig.warmup,
                    torch_threads=torch.get_num_threads(), timing="mean over steps 1..N-1 (step 0 = warm-up)",
                    bebop_rl_defaults=asdict(RLConfig(mtp_strategy="none", eval_samples=0)))
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    try:
        import trl
        versions["trl"] = trl.__version__
    except ImportError:
        versions["trl"] = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "versions": versions, "loadavg_at_end": load,
                                "results": results}, indent=2, default=str))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
