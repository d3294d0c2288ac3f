"""Reward functions of ``bebop rl`` in TRL's form, so one reward file serves TRL's ``GRPOTrainer`` and Bebop:

    def my_reward(prompts, completions, completion_ids, **columns) -> list[float | None]

called once per batch with keyword arguments: ``prompts`` and ``completions`` one per row (text; for a prompt
given as messages, the messages and ``[{"role": "assistant", "content": text}]``, as TRL passes them),
``completion_ids`` the completions' token ids, and each extra column of the user's rows (other JSONL keys,
other dataset columns; for a built-in task, ``answer`` and the problem's data fields) as a list aligned with
the rows. An ``async def`` function is awaited. ``None`` for a row means "not applicable" (TRL's convention) and
counts as 0 in the weighted sum.

``--reward SPEC`` names a function as ``package.module:function`` or ``path/to/file.py:function`` (a path is
taken relative to the working directory; the file's directory is put on ``sys.path``, as Python does for a
script, so it may import its neighbours). The row's reward is ``Σ wᵢ·fᵢ`` with ``--reward-weights`` (default 1
each).

Every failure of a reward function is one :class:`~bebop.errors.BebopError` naming the function and the row:
an exception, a NaN or infinite value, a value that is not a number, or a result of the wrong length.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bebop.errors import BebopError

CALL_ARGS = ("prompts", "completions", "completion_ids")   # what every call passes, besides the columns
RESERVED_COLUMNS = ("prompt", "completion", *CALL_ARGS)     # columns never passed (TRL drops the first three too)


def _short(value: Any, n: int = 60) -> str:
    """``value`` as a one-line repr, cut to ``n`` characters."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def _is_path(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def _import_file(spec: str, module: str):
    """The module of the ``.py`` file ``module`` (loaded once per process: later loads return the same module,
    so its globals are not reset); its directory goes on ``sys.path``."""
    path = Path(module).expanduser().resolve()
    if not path.is_file():
        raise BebopError(f"cannot load reward {spec!r}: no such file {module}")
    name = f"_bebop_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise BebopError(f"cannot load reward {spec!r}: {module} is not a Python file")
    mod = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = mod
    try:
        loader_spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def load_reward_function(spec: str) -> Callable:
    """The function named by ``spec`` (``module:function`` or ``file.py:function``), checked to be callable with
    TRL's arguments; any failure is a BebopError naming ``spec``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise BebopError(f"reward {spec!r} is not 'module:function' or 'path/to/file.py:function'")
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise BebopError(f"reward {spec!r} is not 'module:function' or 'path/to/file.py:function'")
    try:
        mod = _import_file(spec, module) if _is_path(module) else importlib.import_module(module)
    except BebopError:
        raise
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise BebopError(f"cannot load reward {spec!r}: no module named {e.name!r}") from None
        raise BebopError(f"cannot load reward {spec!r}: importing {module} raised {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import
        raise BebopError(f"cannot load reward {spec!r}: importing {module} raised {type(e).__name__}: {e}") from None
    if not hasattr(mod, name):
        raise BebopError(f"cannot load reward {spec!r}: {module} has no function {name!r}")
    fn = getattr(mod, name)
    if not callable(fn):
        raise BebopError(f"reward {spec!r} is not callable (it is a {type(fn).__name__})")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return fn
    try:
        sig.bind(**{a: [] for a in CALL_ARGS})
    except TypeError as e:
        raise BebopError(f"reward {spec!r} does not take TRL's reward arguments f(prompts, completions, **kwargs) "
                         f"({e})") from None
    return fn


def parse_weights(weights: Sequence[float] | str | None, n: int) -> list[float]:
    """``--reward-weights`` as floats, one per reward function (all 1 when None); a comma-separated string is
    split. A count that does not match ``n`` or a non-finite weight is an error."""
    if weights is None:
        return [1.0] * n
    items = [w.strip() for w in weights.split(",")] if isinstance(weights, str) else list(weights)
    out = []
    for w in items:
        try:
            if isinstance(w, bool):
                raise ValueError
            out.append(float(w))
        except (TypeError, ValueError):
            raise BebopError(f"--reward-weights: {w!r} is not a number") from None
        if not math.isfinite(out[-1]):
            raise BebopError(f"--reward-weights: {w!r} is not finite")
    if len(out) != n:
        raise BebopError(f"--reward-weights has {len(out)} weight{'s' * (len(out) != 1)} for {n} reward "
                         f"function{'s' * (n != 1)} (--reward); give one weight per --reward")
    return out


def _where_raised(e: BaseException) -> str:
    """``file:line`` of the innermost frame of ``e``'s traceback (where the reward function raised)."""
    frames = traceback.extract_tb(e.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


@dataclass(frozen=True)
class Row:
    """What an error message says about one row: its position in the call and its prompt (and source)."""

    prompt: Any
    source: str | None = None

    def describe(self, i: int, n: int) -> str:
        src = f", {self.source}" if self.source else ""
        return f"row {i} of {n} (prompt {_short(self.prompt)}{src})"


class Rewards:
    """Reward functions named by ``specs`` with their ``weights``, loaded in this process."""

    def __init__(self, specs: Sequence[str], weights: Sequence[float] | str | None = None) -> None:
        if not specs:
            raise BebopError("no reward function given")
        self.names = list(specs)
        self.functions = [load_reward_function(s) for s in self.names]
        self.weights = parse_weights(weights, len(self.names))

    def _call(self, fn: Callable, kwargs: dict) -> Any:
        out = fn(**kwargs)
        if inspect.isawaitable(out):
            out = asyncio.run(_await(out))
        return out

    def _one(self, name: str, fn: Callable, kwargs: dict, rows: Sequence[Row]) -> list[float | None]:
        """``fn``'s values for the rows, each None or a finite float; anything else is a BebopError."""
        n = len(rows)
        try:
            out = self._call(fn, kwargs)
        except Exception as e:  # noqa: BLE001 - the user's code
            raise self._raised(name, fn, kwargs, rows, e) from None
        if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__") or not hasattr(out, "__iter__"):
            raise BebopError(f"reward {name!r} returned {_short(out)} ({type(out).__name__}), not a list of "
                             f"{n} floats (one per completion)")
        if len(out) != n:
            raise BebopError(f"reward {name!r} returned {len(out)} value{'s' * (len(out) != 1)} for {n} "
                             f"completions (one per completion expected)")
        values: list[float | None] = []
        for i, v in enumerate(out):
            if v is None:
                values.append(None)
                continue
            try:
                if isinstance(v, (str, bytes)):
                    raise TypeError
                x = float(v)
            except (TypeError, ValueError):
                raise BebopError(f"reward {name!r} returned {_short(v)} ({type(v).__name__}), not a number, for "
                                 f"{rows[i].describe(i, n)}") from None
            if not math.isfinite(x):
                raise BebopError(f"reward {name!r} returned {x} for {rows[i].describe(i, n)}")
            values.append(x)
        return values

    def _raised(self, name: str, fn: Callable, kwargs: dict, rows: Sequence[Row], e: Exception) -> BebopError:
        """The error for ``fn`` raising ``e`` on the batch: the function is called again on each row alone to
        find the first row that raises (reward functions are pure in practice; this runs only on failure)."""
        what = f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
        n = len(rows)
        for i in range(n):
            one = {k: (v[i : i + 1] if isinstance(v, list) else v) for k, v in kwargs.items()}
            try:
                self._call(fn, one)
            except Exception as e1:  # noqa: BLE001 - the user's code
                what = f"{type(e1).__name__}: {' '.join(str(e1).split())}"[:300]
                return BebopError(f"reward {name!r} raised {what} (at {_where_raised(e1)}) on "
                                  f"{rows[i].describe(i, n)}")
        return BebopError(f"reward {name!r} raised {what} (at {_where_raised(e)}) on the batch of {n} rows (no "
                          f"single row raises alone; the first: {rows[0].describe(0, n) if rows else 'none'})")

    def score(self, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict[str, list],
              rows: Sequence[Row]) -> tuple[list[float], dict[str, list[float | None]]]:
        """``(total, parts)``: each row's ``Σ wᵢ·fᵢ`` (None counted as 0), and each function's values."""
        kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
        parts = {name: self._one(name, fn, kwargs, rows) for name, fn in zip(self.names, self.functions, strict=True)}
        total = [sum(w * (parts[name][i] or 0.0) for name, w in zip(self.names, self.weights, strict=True))
                 for i in range(len(rows))]
        return total, parts


async def _await(awaitable):
    return await awaitable


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None (TRL's nanmean), or None when there are none."""
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def reward_means(parts: dict[str, list[float | None]]) -> dict[str, float | None]:
    """``{"rewards/NAME": mean}`` of each function's values (None rows left out), for the logs."""
    return {f"rewards/{name}": mean_or_none(v) for name, v in parts.items()}
