"""Declared dependency floors are versions the code runs on: the installed environment satisfies every
requirement in pyproject.toml, the transformers classes the code calls with ``cache=`` take that keyword
(older 5.x releases name it ``past_key_values`` and would swallow ``cache`` into ``**kwargs`` unused), and no
floor admits a release below what that transformers needs."""

from __future__ import annotations

import inspect
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def declared() -> tuple[dict[str, Requirement], dict[str, Requirement]]:
    """(core requirements, optional-extra requirements) by package name."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    core = {r.name: r for r in map(Requirement, project["dependencies"])}
    extras = {r.name: r for deps in project["optional-dependencies"].values() for r in map(Requirement, deps)}
    return core, extras


def test_installed_versions_satisfy_the_declared_requirements():
    core, extras = declared()
    for name, req in core.items():
        assert req.specifier.contains(version(name), prereleases=True), f"{name} {version(name)} vs {req}"
    for name, req in extras.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue                          # an extra that is not installed here
        assert req.specifier.contains(installed, prereleases=True), f"{name} {installed} vs {req}"


@pytest.mark.parametrize("name, too_old", [
    ("transformers", "5.23.0"),   # MtpLayer / Qwen3 forwards take ``cache`` from 5.24 on
    ("torch", "2.5.1"),           # transformers 5.24 disables PyTorch below 2.6
    ("tokenizers", "0.23.0"),     # transformers 5.24 needs tokenizers >= 0.23.1
    ("safetensors", "0.7.0"),     # transformers 5.24 needs safetensors >= 0.8.0
])
def test_declared_floor_excludes_releases_the_code_cannot_run_on(name, too_old):
    core, _ = declared()
    assert not core[name].specifier.contains(too_old), f"{core[name]} admits {name} {too_old}"


def test_transformers_forwards_take_the_cache_keyword():
    from transformers.modeling_layers import MtpLayer
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3Model

    for cls in (MtpLayer, Qwen3Model, Qwen3DecoderLayer):
        params = inspect.signature(cls.forward).parameters
        assert "cache" in params and "past_key_values" not in params, f"{cls.__name__}.forward{list(params)}"
