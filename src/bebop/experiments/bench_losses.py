"""`bebop bench losses`: one MTP head per training loss on identical data, steps and seeds, each measured through
the engine under RS and TO, so the comparison isolates the loss (DESIGN §4)."""

from __future__ import annotations

from bebop.experiments.measure import Probe, measure_acceptance
from bebop.experiments.options import LossBenchConfig

__all__ = ["LossBenchConfig", "bench_losses"]


def bench_losses(model_dir: str, out_dir: str, cfg: LossBenchConfig) -> dict:
    """Fine-tune one head per loss from one shared starting head on identical data, steps and seeds; measure
    each through the engine under RS and TO at every temperature in ``cfg.temperatures`` on held-out prompts.
    The shared head is ``cfg.init``, else the checkpoint's native MTP layer when it ships one, else a forward-KL
    warm start trained once into ``out_dir/warm_start``:
    TV-type gradients vanish far from p (DESIGN §4), so from random heads the ranking would measure distance
    from initialisation rather than the loss. Heads train and are measured on ``cfg.device`` in ``cfg.dtype``
    (``bebop.models.device``)."""
    from dataclasses import replace
    from pathlib import Path

    from bebop.models.checkpoint import NATIVE, load_head
    from bebop.models.native import has_native_mtp
    from bebop.models.policy import load_policy
    from bebop.training.train_mtp import TrainMTPConfig, train_mtp, train_warm_head

    model, tokenizer = load_policy(model_dir, cfg.device, cfg.dtype)
    base = TrainMTPConfig(model=model_dir, task=cfg.task, gamma_train=cfg.gamma_train, steps=cfg.steps, lr=cfg.lr,
                          data_samples=cfg.data_samples, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype)
    init = cfg.init
    if init is None and has_native_mtp(model):
        init = NATIVE
    if init is None:
        init = str(Path(out_dir) / "warm_start")
        train_warm_head(replace(base, out=init))
    results: dict[str, dict] = {}
    for loss in cfg.losses:
        head_dir = Path(out_dir) / loss
        train_mtp(replace(base, out=str(head_dir), loss=loss, init=init))
        head = load_head(head_dir, model).eval()
        row: dict[str, object] = {}
        for tau in cfg.temperatures:
            suffix = "" if tau == cfg.temperatures[0] else f"_t{tau:g}"
            for rule, tag in (("rejection", "rs"), ("target_only", "to")):
                r = measure_acceptance(model, tokenizer, head, Probe(cfg.task, rule, tau, cfg.gamma, cfg.eval_prompts,
                                                                     cfg.batch_size, cfg.max_new_tokens,
                                                                     cfg.seed + 99_991))
                row[f"alpha_{tag}{suffix}"] = r["alpha"]
                row[f"accept_length_{tag}{suffix}"] = r["accept_length"]
        results[loss] = row
    return results
