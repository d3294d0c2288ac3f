"""Golden ``bebop <cmd> --help`` snapshots: every command, flag and default stays as it is unless a change
means it (then regenerate with ``BEBOP_UPDATE_GOLDEN=1 pytest tests/cli/test_cli_help.py`` and review the diff)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bebop.cli import app

GOLDEN = Path(__file__).parent / "golden" / "help"
COMMANDS = [
    [], ["sft"], ["eval"], ["train-mtp"], ["eval-mtp"], ["generate"], ["export"], ["bench"], ["bench", "decode"],
    ["bench", "losses"], ["bench", "rl"], ["bench", "batching"], ["rl"], ["demo"], ["analyze"], ["analyze", "sweep"],
    ["analyze", "entropy"],
]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def render_help(args: list[str]) -> str:
    """``bebop ARGS --help`` at a fixed width, colours off, trailing spaces stripped."""
    env = {"COLUMNS": "160", "TERMINAL_WIDTH": "160", "NO_COLOR": "1", "TERM": "dumb",
           "_TYPER_FORCE_DISABLE_TERMINAL": "1"}
    result = CliRunner().invoke(app, [*args, "--help"], env=env, prog_name="bebop")
    assert result.exit_code == 0, result.output
    return "\n".join(line.rstrip() for line in _ANSI.sub("", result.output).splitlines()) + "\n"


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: "-".join(a) or "bebop")
def test_help_matches_golden(args: list[str]) -> None:
    path = GOLDEN / (("-".join(args) or "bebop") + ".txt")
    text = render_help(args)
    if os.environ.get("BEBOP_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with BEBOP_UPDATE_GOLDEN=1"
    assert text == path.read_text()


def test_every_command_has_a_golden_file() -> None:
    import typer.main

    group = typer.main.get_command(app)

    def walk(cmd, prefix):
        yield prefix
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*prefix, name])

    assert sorted(walk(group, [])) == sorted(COMMANDS)


@pytest.mark.parametrize(("module", "allowed"), [
    ("bebop.cli", None),
    ("bebop.experiments.plots", {"bebop", "bebop.core", "bebop.core.fits", "bebop.errors", "bebop.experiments",
                                 "bebop.experiments.names", "bebop.experiments.plots"}),
])
def test_light_imports(module: str, allowed: set[str] | None) -> None:
    """The CLI reads every default from torch-free option dataclasses, so ``bebop --help`` loads no model stack;
    the plotting module loads only what it draws with."""
    import subprocess
    import sys

    code = (f"import sys, {module}; print('torch' in sys.modules); "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'bebop')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    torch_loaded, modules = out.stdout.split("\n")[:2]
    assert torch_loaded == "False"
    if allowed is not None:
        assert set(modules.split(",")) == allowed
