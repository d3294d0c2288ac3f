"""Early stopping of head training on held-out expected acceptance.

The score of an evaluation is the held-out expected α averaged over the γ draft steps (:func:`heldout_score`, of the
per-step α_k = E_t[1 − TV(p_k, q_k)] that ``train_mtp.expected_alpha`` measures). A stage stops when the score has
not beaten the best so far by more than ``min_delta`` for ``patience`` evaluations in a row, and the head it keeps is
the one of the best evaluation. Evaluations before step ``min_steps`` are ignored: a stage that starts from a head
better than its loss's own fixed point (a CE stage after a forward-KL warm start loses α at first) would otherwise
stop at once and keep its starting head, which its loss never trained. ``patience = 0`` turns this off (every step
is trained and the last head is kept).

:class:`EarlyStop` is the decision alone, a pure function of the scores it is shown, so that a resumed run rebuilds
it from the logged records (:meth:`EarlyStop.replay`) and decides exactly as the uninterrupted run did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def heldout_score(alpha: Sequence[float]) -> float:
    """The early-stopping score: the mean of the held-out α_k over the γ draft steps."""
    return float(sum(alpha) / len(alpha))


@dataclass
class EarlyStop:
    """Tracks the best score of one stage from step ``min_steps`` on and how many evaluations since have not improved
    on it by more than ``min_delta``; :attr:`stop` says when that count reaches ``patience`` (never when ``patience``
    is 0)."""

    patience: int = 0
    min_delta: float = 0.0
    min_steps: int = 0
    best: float = -math.inf
    best_step: int | None = None
    stale: int = 0                       # evaluations since the best one

    @property
    def active(self) -> bool:
        return self.patience > 0

    def update(self, step: int, score: float) -> bool:
        """Record the evaluation at ``step``; True when it is the new best (the head to keep)."""
        if step < self.min_steps:
            return False
        if score > self.best + self.min_delta or self.best_step is None:
            self.best, self.best_step, self.stale = score, step, 0
            return True
        self.stale += 1
        return False

    @property
    def stop(self) -> bool:
        """Whether the stage should stop now: ``patience`` evaluations in a row without improvement."""
        return self.active and self.stale >= self.patience

    @classmethod
    def replay(cls, patience: int, min_delta: float, min_steps: int,
               scores: Iterable[tuple[int, float]]) -> EarlyStop:
        """The tracker after ``(step, score)`` evaluations in order: where a resumed stage picks up."""
        tracker = cls(patience, min_delta, min_steps)
        for step, score in scores:
            tracker.update(step, score)
        return tracker
