"""Reusing the cache slots that rejected drafts, finished rows and joining rows leave as holes.

The engine's caches are rectangular: every verify appends γ+1 columns for every row, and a row keeps only the slots
it accepted. At accept length A a row's cache grows by (γ+1)/A slots per kept token, and attention reads them all.
When the longest held row's holes pass :data:`COMPACT_WASTE` of the columns (and at least :data:`COMPACT_MIN`
columns), :func:`compact` moves every held row's valid slots to the left, in order, in every cache
(``Forwards.compact``). A row's attention over its valid slots does not depend on where they sit (positions are
explicit), so no output changes. Waste thus stays near the threshold: between compactions the holes grow again.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["COMPACT_MIN", "COMPACT_WASTE", "compact", "longest_row", "wasteful"]

COMPACT_WASTE = 0.1
"""Compact when the longest held row's holes pass this share of the columns."""
COMPACT_MIN = 16
"""…and number at least this many columns (a gather of a tiny cache is not worth it)."""


def wasteful(length: int, longest: int) -> bool:
    """Whether ``length`` used columns are worth compacting down to ``longest``."""
    return longest > 0 and length - longest > max(COMPACT_MIN, COMPACT_WASTE * length)


def longest_row(st, held: Tensor) -> Tensor:
    """The most valid slots any held row has (a device scalar: the caller reads it at its host sync)."""
    return (st.valid.narrow(1, 0, st.length) & held.unsqueeze(1)).sum(1).max()


def compact(fw, st, held: Tensor, longest: int) -> None:
    """Move every held row's valid slots to columns 0..count−1 (in order) in every cache of ``fw`` and forget the
    other rows' slots; ``st`` (a ``SpecState``) then uses ``longest`` columns."""
    valid = st.valid.narrow(1, 0, st.length) & held.unsqueeze(1)
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
    fw.compact(order, longest)
    counts = valid.sum(1, keepdim=True)
    st.valid.zero_()
    st.valid.narrow(1, 0, longest).copy_(torch.arange(longest, device=valid.device) < counts)
    st.length = longest
