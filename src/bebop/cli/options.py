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
