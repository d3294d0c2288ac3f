"""Option types shared by several commands (so each flag reads the same everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML file with config values.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write results here.")]
MtpListOpt = Annotated[list[Path], typer.Option(
    "--mtp", help="MTP head (dir or .safetensors, or native = the model's own MTP layer); repeatable.")]

DEVICE_HELP = "Where models run: auto (CUDA when available, else CPU), cpu, cuda or cuda:i."
DTYPE_HELP = "Model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16 (CUDA only)."
TRAINED = " Trained weights stay float32 (compute under autocast)."
DeviceOpt = Annotated[str, typer.Option(help=DEVICE_HELP)]
DtypeOpt = Annotated[str, typer.Option(help=DTYPE_HELP)]
TrainDtypeOpt = Annotated[str, typer.Option(help=DTYPE_HELP + TRAINED)]
# training commands whose options fall back to a TOML file: None = not given here
TomlDeviceOpt = Annotated[str | None, typer.Option("--device", help=DEVICE_HELP + " Default: auto.")]
TomlDtypeOpt = Annotated[str | None, typer.Option("--dtype", help=DTYPE_HELP + TRAINED + " Default: auto.")]

# where a head's prompts come from (train-mtp, eval-mtp): one of these, none = the arith task
TaskSourceOpt = Annotated[str | None, typer.Option(
    help="Built-in task whose prompts the policy samples on (the default source: arith).")]
PromptsOpt = Annotated[str | None, typer.Option(
    help='JSONL of prompts: {"prompt": "..."} or {"messages": [...]} per line (chat template applied).')]
DatasetOpt = Annotated[str | None, typer.Option(
    help="A `datasets` dataset of prompts: local file or directory, cached or hub name.")]
FieldOpt = Annotated[str | None, typer.Option(help="The dataset's prompt column (default: prompt, else messages).")]
CompletionsOpt = Annotated[str | None, typer.Option(
    help="JSONL of existing rollouts (prompt or messages + completion per line), used as given: no sampling.")]
CacheDirOpt = Annotated[str | None, typer.Option(
    help="Policy-sample cache for user prompts (default $BEBOP_CACHE/samples or ~/.cache/bebop/samples; '' = off).")]
