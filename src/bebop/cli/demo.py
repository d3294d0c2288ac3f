"""``bebop demo``: the end-to-end reproduction of DESIGN §6 (stages cached in ``--out``)."""

from __future__ import annotations

from typing import Annotated

import typer

from bebop.cli.options import ConfigOpt, TomlDeviceOpt, TomlDtypeOpt
from bebop.cli.render import announce_paths, console


def demo_cmd(
    out: Annotated[str | None, typer.Option(help="Demo directory (stages are cached here).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="CI smoke preset: a tiny policy, every file written, "
                                                        "meaningless numbers.")]
    = False,
    model: Annotated[str | None, typer.Option(help="Reuse this SFT policy directory and skip SFT.")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Redo every stage instead of reusing cached outputs.")]
    = False,
    ablations: Annotated[bool, typer.Option("--ablations", help="After the main stages, also run the ablations "
                                                                "(2 MTP layers, γ_train 5, half / double head "
                                                                "budget, training data at τ 0.7 / 1.3, two more "
                                                                "head seeds, 4× the RL steps), each a cached stage; "
                                                                "TOML key ablations selects a subset.")]
    = False,
    gpu_costs: Annotated[str | None, typer.Option(help="A benchmarks/gpu_costs.py JSON: claim 5 shows its projected "
                                                       "GPU step speedup (labelled, not judged).")] = None,
    device: TomlDeviceOpt = None,
    dtype: TomlDtypeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """SFT policy → MTP heads (CE, e2e TV) → τ sweep → entropy analysis → short RL runs → report.md, plots and
    summary.json with a verdict for each claim of DESIGN §6 (held / not held / inconclusive, from bootstrap CIs)."""
    from bebop.config import check_model_dir, make_config, read_toml
    from bebop.experiments.demo import QUICK, DemoConfig, run_demo

    file_keys = set(read_toml(config)) if config is not None else set()
    preset = {k: v for k, v in QUICK.items() if k not in file_keys} if quick else {}  # the file wins over --quick
    announce_paths()
    cfg = make_config(DemoConfig, config, **preset, out=out, model=model, fresh=fresh or None, device=device,
                      dtype=dtype, gpu_costs=gpu_costs, ablations="all" if ablations else None)
    if cfg.model:
        check_model_dir(cfg.model)  # before run_demo creates OUT
    run_demo(cfg, console=console)
