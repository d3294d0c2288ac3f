"""RL benchmark (DESIGN §5–§6): short GRPO runs that differ only in how rollouts are drafted and verified.

Every method runs ``train_rl`` with the same policy, task, seed, prompts and settings, one after the other
in one process, so step times are measured side by side. Methods:
  none            plain sampling (no MTP)
  rs-e2e_tv       frozen e2e-TV head, rejection sampling (the Bebop recipe)
  to-e2e_tv       frozen e2e-TV head, target-only verification
  rs-ce / to-ce   frozen CE head under RS / TO (needs ``mtp_ce``)
  rs-online-ce    CE head re-trained online every ``online_every`` steps, RS (needs ``mtp_ce`` as its start)
Timing means skip step 0 (warm-up). Accept-length drift compares each step with step 0, and the mean of
the last five steps with the mean of the first five.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bebop.errors import BebopError
from bebop.rl.config import RLConfig
from bebop.rl.trainer import train_rl

METHODS = {  # name → (mtp_strategy, rule, which head)
    "none": ("none", "rejection", None),
    "rs-e2e_tv": ("frozen", "rejection", "mtp"),
    "to-e2e_tv": ("frozen", "target_only", "mtp"),
    "rs-ce": ("frozen", "rejection", "mtp_ce"),
    "to-ce": ("frozen", "target_only", "mtp_ce"),
    "rs-online-ce": ("online-ce", "rejection", "mtp_ce"),
}


@dataclass
class RLBenchConfig:
    model: str = "runs/arith/base"
    mtp: str | None = "runs/arith/mtp_e2e_tv"
    mtp_ce: str | None = None
    task: str = "arith"
    out: str = "runs/bench_rl"
    methods: str = "none,rs-e2e_tv,to-e2e_tv"
    steps: int = 30
    eval_samples: int = 512
    async_rollouts: bool = False
    rl: RLConfig = field(default_factory=lambda: RLConfig(mtp_strategy="none"))  # settings shared by all methods

    def method_list(self) -> list[str]:
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        for m in names:
            if m not in METHODS:
                raise BebopError(f"unknown RL bench method {m!r}; choose from: {', '.join(METHODS)}")
            head = METHODS[m][2]
            if head is not None and not getattr(self, head):
                raise BebopError(f"method {m!r} needs --{head.replace('_', '-')} DIR")
        if not names:
            raise BebopError("no RL bench methods given")
        return names


def method_config(cfg: RLBenchConfig, name: str) -> RLConfig:
    strategy, rule, head = METHODS[name]
    return replace(cfg.rl, model=cfg.model, task=cfg.task, mtp=getattr(cfg, head) if head else None,
                   mtp_strategy=strategy, rule=rule, steps=cfg.steps, eval_samples=cfg.eval_samples,
                   async_rollouts=cfg.async_rollouts, out=str(Path(cfg.out) / name))


def summarize_run(rows: list[dict], summary: dict) -> dict:
    """Per-method figures from a run's per-step rows (``rl.jsonl``) and its ``rl_summary.json``."""
    timed = rows[1:] or rows
    mean = {k: sum(r[k] for r in timed) / len(timed) for k in ("step_s", "rollout_s", "train_s")}
    res = {
        "mean_step_s": mean["step_s"], "mean_rollout_s": mean["rollout_s"], "mean_train_s": mean["train_s"],
        "reward_first5": _mean(rows[:5], "reward"), "reward_last5": _mean(rows[-5:], "reward"),
        "entropy_first5": _mean(rows[:5], "entropy"), "entropy_last5": _mean(rows[-5:], "entropy"),
        "accuracy_before": summary.get("eval_before", {}).get("accuracy"),
        "accuracy_after": summary.get("eval_after", {}).get("accuracy"),
        "per_step": [{k: r.get(k) for k in ("step", "reward", "entropy", "accept_length", "alpha", "step_s",
                                             "rollout_s", "train_s")} for r in rows],
    }
    if "accept_length" in rows[0]:
        a0 = rows[0]["accept_length"]
        res.update(
            accept_length_step0=a0,
            accept_length_first5=_mean(rows[:5], "accept_length"),
            accept_length_last5=_mean(rows[-5:], "accept_length"),
            max_rel_dev_from_step0=max(abs(r["accept_length"] - a0) / a0 for r in rows),
        )
        res["drift_last5_vs_first5"] = res["accept_length_last5"] / res["accept_length_first5"] - 1.0
    return res


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def bench_rl(cfg: RLBenchConfig, console=None) -> dict:
    """Run every method; returns ``{method: figures}`` plus speedups against ``none`` when it ran."""
    results: dict = {}
    for name in cfg.method_list():
        rc = method_config(cfg, name)
        summary = train_rl(rc, console=console)
        rows = [json.loads(ln) for ln in (Path(rc.out) / "rl.jsonl").read_text().splitlines()]
        results[name] = summarize_run(rows, summary)
    if "none" in results:
        base = results["none"]
        for r in results.values():
            r["step_speedup"] = base["mean_step_s"] / r["mean_step_s"]
            r["rollout_speedup"] = base["mean_rollout_s"] / r["mean_rollout_s"]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_rl.json").write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=2))
    return results
