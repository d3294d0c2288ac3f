"""A reward that kills its own process once (a Ray rollout worker dying mid-step), for tests/rl/test_faults.py.

When ``$BEBOP_TEST_DEATHS/die_at_call`` holds n, the worker process dies on its n-th reward call (one call per
step), i.e. while grading step n - 1; the file is removed first, so the fresh worker that re-runs the shard grades
normally.
Without that file it is the digit reward of rl_rewards."""

from __future__ import annotations

import os
from pathlib import Path

from rl_rewards import digit_fraction

_calls = 0


def dies_once(prompts, completions, **columns) -> list[float]:
    global _calls
    _calls += 1
    mark = Path(os.environ.get("BEBOP_TEST_DEATHS", "/nonexistent")) / "die_at_call"
    if mark.is_file() and int(mark.read_text()) == _calls:
        mark.unlink()
        os._exit(1)
    return digit_fraction(prompts, completions, **columns)
