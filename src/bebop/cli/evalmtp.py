"""``bebop eval-mtp``: a head's acceptance on a user's own data (prompts, a dataset, existing rollouts or a built-in
task), teacher-forced along the policy's samples (``experiments.eval_mtp``). Defaults live in the torch-free
:class:`EvalMTPConfig`, so ``bebop --help`` loads no model stack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from bebop.cli.options import (
    CacheDirOpt,
    CompletionsOpt,
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    FieldOpt,
    JsonOpt,
    PromptsOpt,
    TaskSourceOpt,
)
from bebop.cli.render import announce_paths, console, fmt, print_dict, table, write_json, wrote
from bebop.config import check_device, check_dtype, check_gamma, positive
from bebop.errors import BebopError
from bebop.training.options import DataSource


@dataclass
class EvalMTPConfig:
    """Options of ``bebop eval-mtp`` (besides the model, the head and the data source)."""

    temperature: float = 1.0          # the rollout temperature: samples, p and q
    gamma: int = 3
    samples: int = 256                # policy samples (user prompts are cycled to this many; rollouts: all)
    max_new_tokens: int = 96          # the rollout budget
    seed: int = 0
    buckets: int = 10                 # equal-width entropy buckets
    batch_size: int = 64              # sequences per teacher-forced forward
    cache_dir: str | None = None      # policy-sample cache for user prompts (None: the default, "": off)
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        check_device(self.device)
        check_dtype(self.dtype)
        check_gamma(self.gamma)
        if not self.temperature > 0:
            raise BebopError(f"temperature must be > 0 for eval-mtp, got {self.temperature}")
        for name in ("samples", "max_new_tokens", "buckets", "batch_size"):
            positive(name, getattr(self, name))


C = EvalMTPConfig


def eval_rows(model, tokenizer, source: DataSource, cfg: EvalMTPConfig, model_dir: Path):
    """``(rows, budget)``: the policy samples to evaluate on and the rollout budget to count verify steps within.
    Sampled sources are drawn ``sample_length`` tokens long so the last verify step's drafts have their targets;
    a user's prompts are all used. A user's rollouts are taken whole, with no budget (every position whose γ
    targets exist)."""
    from bebop.experiments.eval_mtp import sample_length
    from bebop.training.samples import source_rows

    source = source.resolved()
    budget = None if source.kind == "completions" else cfg.max_new_tokens
    length = cfg.max_new_tokens if budget is None else sample_length(cfg.max_new_tokens, cfg.gamma)
    rows = source_rows(model, tokenizer, source, cfg.samples, cfg.temperature, length, cfg.seed,
                       cache_dir=cfg.cache_dir, model_dir=str(model_dir), share="all")
    return rows, budget


def run_eval_mtp(model_dir: Path, mtp: Path, source: DataSource, cfg: EvalMTPConfig) -> dict:
    """Load the policy and head, draw the rows and evaluate; the result plus its ``config``."""
    from bebop.cli.generate import load_model_and_head
    from bebop.core.sampling import SamplingParams
    from bebop.experiments.eval_mtp import eval_mtp

    source.check()
    model, tokenizer, head = load_model_and_head(model_dir, mtp, cfg.device, cfg.dtype)
    rows, budget = eval_rows(model, tokenizer, source, cfg, model_dir)
    res = eval_mtp(model, head, rows, cfg.gamma, SamplingParams(temperature=cfg.temperature),
                   tokenizer.pad_token_id, cfg.buckets, budget, cfg.batch_size)
    res["config"] = {"model": str(model_dir), "mtp": str(mtp), "source": source.resolved().kind,
                     "data": source.resolved().label, "split": source.split if source.dataset else None,
                     "field": source.field, "samples": cfg.samples, "seed": cfg.seed,
                     "max_new_tokens": cfg.max_new_tokens, "n_buckets": cfg.buckets, "device": str(model.device),
                     "dtype": str(model.dtype).removeprefix("torch.")}
    return res


def _tables(res: dict) -> None:
    rs, to = res["rejection"], res["target_only"]

    def se(values, errors, k):
        return f"{fmt(values[k])} ± {fmt(errors[k], '.4f')}"

    rows = [(str(k + 1), se(rs["alpha"], rs["alpha_se"], k), se(to["alpha"], to["alpha_se"], k),
             fmt(rs["position_alpha"][k]), fmt(to["position_alpha"][k])) for k in range(res["gamma"])]
    title = (f"eval-mtp: α_k at τ={res['temperature']:g}, γ={res['gamma']} on {res['n_sequences']} sequences, "
             f"{res['n_positions']} positions (α: per verify step as the engine counts it; position α: mean over "
             "positions)")
    console.print(table(title, ("k", "α RS", "α TO", "position α RS", "position α TO"), rows))
    b = res["buckets"]
    bucket_rows = [(f"{h:.3f}", str(n), fmt(r[0]), fmt(t[0]), fmt(lr), fmt(lt))
                   for h, n, r, t, lr, lt in zip(b["entropy"], b["count"], b["rejection"]["alpha"],
                                                 b["target_only"]["alpha"], b["rejection"]["accept_length"],
                                                 b["target_only"]["accept_length"], strict=True)]
    console.print(table("by entropy H(p_1) (per position)", ("entropy", "positions", "α_1 RS", "α_1 TO",
                                                            "accept len RS", "accept len TO"), bucket_rows))
    print_dict("eval-mtp summary (accept length incl. the bonus token)", {
        "accept_length_rs": rs["accept_length"], "accept_length_to": to["accept_length"],
        "position_accept_length_rs": rs["position_accept_length"],
        "position_accept_length_to": to["position_accept_length"], "mean_entropy": res["mean_entropy"],
        "sequences": res["n_sequences"], "positions": res["n_positions"], "temperature": res["temperature"],
        "gamma": res["gamma"]})


def eval_mtp_cmd(
    model: Annotated[Path, typer.Option(help="Policy directory.")],
    mtp: Annotated[Path, typer.Option(
        help="MTP head (dir or .safetensors, or native = the model's own MTP layer).")],
    task: TaskSourceOpt = None,
    prompts: PromptsOpt = None,
    dataset: DatasetOpt = None,
    split: Annotated[str, typer.Option(help="The dataset's split.")] = "train",
    field: FieldOpt = None,
    completions: CompletionsOpt = None,
    temperature: Annotated[float, typer.Option(help="Rollout temperature (samples, p and q).")] = C.temperature,
    gamma: Annotated[int, typer.Option(help="Draft tokens per verification.")] = C.gamma,
    samples: Annotated[int, typer.Option(help="Policy samples to evaluate on (prompts are cycled).")] = C.samples,
    max_new_tokens: Annotated[int, typer.Option(help="Rollout length: completion tokens per sample.")] =
        C.max_new_tokens,
    seed: Annotated[int, typer.Option(help="Seed of prompts and sampling.")] = C.seed,
    buckets: Annotated[int, typer.Option(help="Equal-width entropy buckets.")] = C.buckets,
    batch_size: Annotated[int, typer.Option(help="Sequences per teacher-forced forward.")] = C.batch_size,
    cache_dir: CacheDirOpt = None,
    json_path: JsonOpt = None,
    device: DeviceOpt = C.device,
    dtype: DtypeOpt = C.dtype,
) -> None:
    """An MTP head's acceptance on your data: α_k under RS and TO, accept length and α by entropy, teacher-forced
    along the policy's own samples (the engine's α_k in expectation, drafts past an EOS left out)."""
    cfg = EvalMTPConfig(temperature=temperature, gamma=gamma, samples=samples, max_new_tokens=max_new_tokens,
                        seed=seed, buckets=buckets, batch_size=batch_size, cache_dir=cache_dir, device=device,
                        dtype=dtype)
    source = DataSource(task=task, prompts=prompts, dataset=dataset, split=split, field=field,
                        completions=completions).check()
    announce_paths()
    res = run_eval_mtp(model, mtp, source, cfg)
    _tables(res)
    write_json(json_path, res)
    if json_path is not None:
        wrote(json_path)
