"""``bebop generate``: sample completions from a policy, plainly or with an MTP head (draft → verify)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from bebop.cli.options import DeviceOpt, DtypeOpt
from bebop.cli.render import announce_paths, console, print_dict
from bebop.config import check_device, check_dtype, check_gamma, positive
from bebop.errors import BebopError

AUTO_GAMMA_MAX = 5  # longest draft ``--gamma auto`` may plan


@dataclass
class GenerateConfig:
    """Options of ``bebop generate`` (prompts, sampling transforms and drafting)."""

    task: str = "arith"               # prompts come from this task when no --prompt is given
    n: int = 4
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    gamma: str = "3"                  # a positive integer or "auto"
    rule: str = "rejection"
    max_new_tokens: int = 96
    seed: int = 0
    backend: str = "auto"             # auto (lean when supported) | lean (an error when not) | transformers
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        check_device(self.device)
        check_dtype(self.dtype)
        positive("n", self.n)
        positive("max_new_tokens", self.max_new_tokens)


G = GenerateConfig


def parse_gamma(gamma: str) -> int | str:
    """``"auto"`` or a positive integer draft length from the ``--gamma`` string."""
    if gamma == "auto":
        return gamma
    try:
        g = int(gamma)
    except ValueError:
        raise BebopError(f"gamma must be a positive integer or 'auto', got {gamma!r}") from None
    return check_gamma(g)


def load_model_and_head(model_dir: Path, mtp_dir: Path | None, device: str = "auto", dtype: str = "auto"):
    """Policy, tokenizer and the MTP head at ``mtp_dir`` in eval mode (None without one), on ``device`` in
    ``dtype`` (the head follows the policy's device and dtype)."""
    from bebop.models.checkpoint import load_head
    from bebop.models.policy import load_policy

    model, tokenizer = load_policy(model_dir, device, dtype)
    head = load_head(mtp_dir, model).eval() if mtp_dir is not None else None
    return model, tokenizer, head


def generate_cmd(
    model: Annotated[Path, typer.Option(help="Policy directory.")],
    mtp: Annotated[Path | None, typer.Option(
        help="MTP head (dir or .safetensors, or native = the model's own MTP layer); omit for plain decoding.")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="Prompt text (repeatable).")] = None,
    task: Annotated[str, typer.Option(help="Task to draw prompts from when --prompt is not given.")] = G.task,
    n: Annotated[int, typer.Option(help="Number of task prompts.")] = G.n,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = G.temperature,
    top_k: Annotated[int | None, typer.Option(help="Top-k (off by default).")] = G.top_k,
    top_p: Annotated[float | None, typer.Option(help="Top-p in (0, 1] (off by default).")] = G.top_p,
    gamma: Annotated[str, typer.Option(help="Draft tokens per verification, or 'auto' (adaptive γ ≤ 5, "
                                            "calibrated on these prompts first).")] = G.gamma,
    rule: Annotated[str, typer.Option(help="rejection, target_only, greedy or auto (RS or TO per row).")] = G.rule,
    max_new_tokens: Annotated[int, typer.Option(help="Completion length cap.")] = G.max_new_tokens,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = G.seed,
    backend: Annotated[str, typer.Option(help="Forwards: auto (the lean path when the model supports it, else "
                                              "transformers' modules), lean (an error when unsupported) or "
                                              "transformers.")] = G.backend,
    device: DeviceOpt = G.device,
    dtype: DtypeOpt = G.dtype,
) -> None:
    """Sample completions (plain, or MTP draft→verify with --mtp) and print them with decode metrics."""
    announce_paths()
    cfg = GenerateConfig(task=task, n=n, temperature=temperature, top_k=top_k, top_p=top_p, gamma=gamma, rule=rule,
                         max_new_tokens=max_new_tokens, seed=seed, backend=backend, device=device, dtype=dtype)
    texts, completions, metrics = run_generate(model, mtp, prompt, cfg)
    for t, c in zip(texts, completions, strict=True):
        console.print(f"[bold]{t.strip()}[/]\n{c}\n", highlight=False)
    print_dict("decode metrics", metrics)


def run_generate(model_dir: Path, mtp_dir: Path | None, prompt: list[str] | None,
                 cfg: GenerateConfig) -> tuple[list[str], list[str], dict]:
    """Decode ``prompt`` (or ``cfg.n`` task prompts): prompts, completions and the decode metrics."""
    import torch

    from bebop.core.sampling import SamplingParams
    from bebop.engine.decode import DecodeConfig, generate, generate_mtp
    from bebop.engine.dispatch import check_memory
    from bebop.engine.forwards import BACKENDS, decoding_path
    from bebop.experimental.adaptive import as_policy, calibrate
    from bebop.tasks import get_task, sample_problems

    params = SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    g = parse_gamma(cfg.gamma)
    if cfg.backend not in BACKENDS:
        raise BebopError(f"unknown backend {cfg.backend!r}; choose one of: {', '.join(BACKENDS)}")
    model, tokenizer, head = load_model_and_head(model_dir, mtp_dir, cfg.device, cfg.dtype)
    path = decoding_path(model, head, cfg.backend)     # backend "lean" on an unsupported model fails here
    texts = prompt or [p.prompt for p in sample_problems(get_task(cfg.task), cfg.n, cfg.seed)]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    gen = torch.Generator(device=model.device).manual_seed(cfg.seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    check_memory(model, head, prompts, DecodeConfig(params, cfg.max_new_tokens, eos, AUTO_GAMMA_MAX if g == "auto"
                                                    else g, pad_id=pad, backend=cfg.backend))
    if head is None:
        r = generate(model, prompts, params, cfg.max_new_tokens, eos, pad, gen, backend=cfg.backend)
    else:
        if g == "auto":
            dc = DecodeConfig(params, cfg.max_new_tokens, eos, pad_id=pad, backend=cfg.backend)
            g = calibrate(model, head, [prompts], dc, AUTO_GAMMA_MAX, cfg.seed, repeats=1)
        r = generate_mtp(model, head, prompts, params, cfg.max_new_tokens, eos, as_policy(g, cfg.rule), cfg.rule,
                         pad, gen, backend=cfg.backend)
    metrics = {**r.metrics.to_dict(), "backend": path.backend}
    return texts, tokenizer.batch_decode(r.completions(), skip_special_tokens=True), metrics
