"""Dataclass configs: defaults in code, then a TOML file (``--config``), then CLI flags, in that order."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from bebop.errors import BebopError

C = TypeVar("C")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML config file; missing or malformed files give a BebopError naming the path."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise BebopError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise BebopError(f"cannot read config file {path}: {e}") from None


def make_config(cls: type[C], config_file: str | Path | None = None, **overrides: Any) -> C:
    """Build ``cls`` from its defaults, the TOML file (top-level keys or a table named like the
    command) and the non-None ``overrides``. Unknown keys are an error naming the key."""
    raw = read_toml(config_file) if config_file is not None else {}
    for key, value in overrides.items():
        if value is None:
            continue
        *tables, leaf = key.split(".")
        node = raw
        for t in tables:
            node = node.setdefault(t, {})
        node[leaf] = value
    return _build(cls, raw, str(config_file or "flags"))


def from_dict(cls: type[C], raw: dict[str, Any], where: str = "dict") -> C:
    """Build ``cls`` from a plain dict (e.g. a run's saved config); unknown keys name ``where``."""
    return _build(cls, raw, where)


def _build(cls: type[C], raw: dict[str, Any], where: str, base: C | None = None) -> C:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            if isinstance(value, dict):
                continue  # a table meant for another command
            raise BebopError(f"unknown config key {key!r} in {where}; expected one of {sorted(fields)}")
        factory = fields[key].default_factory  # type: ignore[misc]
        inner = factory() if isinstance(value, dict) and factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(inner):
            # a nested table overrides the field's default instance (keeping that instance's own defaults)
            values[key] = _build(type(inner), value, f"{where} [{key}]", base=inner)
        else:
            values[key] = value
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except TypeError as e:
        raise BebopError(f"bad config in {where}: {e}") from None


def positive(name: str, value: float) -> None:
    """Raise a BebopError unless ``value`` > 0."""
    if not value > 0:
        raise BebopError(f"{name} must be positive, got {value!r}")


def non_negative(name: str, value: float) -> None:
    """Raise a BebopError unless ``value`` >= 0 (counts where 0 means off)."""
    if not value >= 0:
        raise BebopError(f"{name} must be >= 0, got {value!r}")


def check_model_dir(path: str | Path) -> Path:
    """``path`` if it is a directory with a ``config.json`` (the first thing ``load_policy`` checks), else a
    BebopError naming it: commands whose output directory is created before the model loads call this first, so
    a mistyped path writes nothing."""
    path = Path(path)
    if not path.is_dir():
        raise BebopError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise BebopError(f"model directory {path} has no config.json")
    return path


def check_gamma(value: int, name: str = "gamma") -> int:
    """The one draft-length check: γ counts drafted tokens per verify step (DESIGN §3), so γ ≥ 1."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise BebopError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise BebopError(f"{name} must be >= 1, got {value}")
    return value


DEVICES = ("auto", "cpu", "cuda", "cuda:<i>")
"""Accepted ``--device`` values: ``auto`` = CUDA when available, else CPU."""
DTYPES = ("auto", "float32", "bfloat16", "float16")
"""Accepted ``--dtype`` values: ``auto`` = bfloat16 on CUDA, float32 on CPU."""


def check_device(spec: str) -> str:
    """The ``--device`` string if it is one of :data:`DEVICES` (``cuda:<i>`` with an integer i), else a BebopError
    naming it. Pure string check, so configs validate without importing torch; whether CUDA exists is checked
    when the device is resolved (``bebop.models.device.resolve_device``)."""
    head, _, index = str(spec).partition(":")
    if spec in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit()):
        return spec
    raise BebopError(f"unknown device {spec!r}; choose one of: {', '.join(DEVICES)}")


def check_dtype(spec: str) -> str:
    """The ``--dtype`` string if it is one of :data:`DTYPES`, else a BebopError naming it and the choices."""
    if spec in DTYPES:
        return spec
    raise BebopError(f"unknown dtype {spec!r}; choose one of: {', '.join(DTYPES)}")
