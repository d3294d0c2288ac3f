"""Option types shared by several commands (so each flag reads the same everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML file with config values.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write results here.")]
MtpListOpt = Annotated[list[Path], typer.Option("--mtp", help="MTP head (dir or .safetensors); repeatable.")]
