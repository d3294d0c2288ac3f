"""The speed model of DESIGN §8: the decode speedup limit and Amdahl's law for an RL step."""

import pytest

from bebop.core.speed import rl_step_speedup, speedup_limit


def test_speedup_limit_is_tokens_per_step_over_cost_per_step():
    # verify costs 1.2 plain forwards, each draft 0.1: 3.5 tokens per 1.5 forward-equivalents
    assert speedup_limit(3.5, 2.0, 2.4, 0.2, 3) == pytest.approx(3.5 / 1.5)
    assert speedup_limit(1.0, 1.0, 1.0, 0.0, 3) == 1.0          # nothing accepted, free drafts: no gain


def test_rl_step_speedup_is_amdahl():
    assert rl_step_speedup(0.0, 10.0) == 1.0
    assert rl_step_speedup(1.0, 2.5) == pytest.approx(2.5)
    assert rl_step_speedup(0.6, 2.0) == pytest.approx(1 / (0.4 + 0.3))
    with pytest.raises(ValueError, match="rollout share"):
        rl_step_speedup(1.5, 2.0)
