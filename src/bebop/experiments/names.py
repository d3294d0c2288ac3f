"""Names shared by the analyses, the plots and the CLI tables; imports nothing, so plotting stays light."""

from __future__ import annotations

RULE_NAMES: dict[str, str] = {"rejection": "RS", "target_only": "TO"}   # verification rule → short tag
DEFAULT_TEMPERATURES: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0, 1.3, 1.5)  # the τ sweep of the analyses
