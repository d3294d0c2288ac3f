"""Decode metrics: token and forward counts, per-step acceptance α_k and accept length (DESIGN §3), as totals and
per request (``DecodeMetrics.per_row``), so that intervals can resample prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["ROW_KEYS", "DecodeMetrics", "acceptance_counts"]

ROW_KEYS = ("tokens", "steps", "accepted", "drafted", "reached", "accepted_k", "expected_k")
"""The counters ``DecodeMetrics.per_row`` keeps per request: emitted tokens, verify steps, accepted and drafted
drafts, and per draft step k the steps that reached draft k, accepted it, and the Σ of its expected α_k."""


@dataclass
class DecodeMetrics:
    """One metrics object for a generation call (DESIGN §3, "report both α_k and accept length").

    ``accept_length`` = tokens emitted per target verify forward = 1 + mean accepted drafts, i.e. it COUNTS
    the correction/bonus token. ``alpha`` is the empirical per-step acceptance α_k = P(draft k accepted |
    drafts 1..k-1 accepted); ``expected_alpha`` the rule's α_k computed from p and q (Σ min(p, q) for RS),
    averaged over the rows that reached step k. ``mean_gamma`` = drafts per row-step (γ unless adaptive),
    ``target_only_fraction`` = share of those drafts verified with TO (``rule="auto"``), ``decode_seconds`` =
    ``seconds`` without prefill and ``decode_tokens`` the tokens emitted in that time (every row's first token comes
    from the prefill's last position, so plain and MTP decoding count the same phase).

    ``per_row`` maps each of :data:`ROW_KEYS` to one value per request, in request order (``reached``,
    ``accepted_k`` and ``expected_k``: a list over k per request): the totals are their sums.
    """

    gamma: int = 0
    tokens: int = 0                 # tokens emitted (sampled), all rows
    seconds: float = 0.0
    decode_seconds: float = 0.0     # seconds after prefill (and its first token per row)
    decode_tokens: int = 0          # tokens emitted in decode_seconds
    target_forwards: int = 0        # batched target forwards after prefill
    draft_forwards: int = 0         # batched MTP-head forwards
    steps: int = 0                  # row-steps of draft→verify (one per active row per verify)
    accepted: int = 0               # accepted drafts, summed over row-steps
    drafted: int = 0                # drafts verified, summed over row-steps
    target_only_drafts: int = 0     # drafts verified with TO (rule "auto")
    slot_steps: int = 0             # batch slots summed over decode forwards (continuous batching counts them)
    live_steps: int = 0             # live rows summed over the same forwards: utilization = live / slots
    cache_slots: int = 0            # cache slots each live row attended to, summed over its steps
    kept_slots: int = 0             # slots of its own context (prompt + kept tokens) among them
    prefills: int = 0               # prefill forwards (one per admitted group of rows)
    reached: list[float] = field(default_factory=list)    # per step k: row-steps where draft k was judged
    accepted_k: list[float] = field(default_factory=list)  # per step k: row-steps where draft k was accepted
    expected_k: list[float] = field(default_factory=list)  # per step k: Σ of expected α_k over reached rows
    per_row: dict[str, list] = field(default_factory=dict)  # ROW_KEYS → one value per request (request order)

    def merge(self, other: DecodeMetrics, same_rows: bool = False) -> DecodeMetrics:
        """Add another run's counters (same γ) to these; rates and α are then recomputed from the sums.
        ``per_row``: another call's requests follow these (lists concatenated, in call order); with ``same_rows``,
        ``other`` counts more steps of these same requests (one call's parts) and the per-row counters add."""
        self.per_row = _add_rows(self.per_row, other.per_row) if same_rows else _concat_rows(self.per_row,
                                                                                              other.per_row)
        if not self.reached:
            self.gamma = other.gamma
            self.reached, self.accepted_k, self.expected_k = ([0.0] * other.gamma for _ in range(3))
        for name in ("tokens", "seconds", "decode_seconds", "decode_tokens", "target_forwards", "draft_forwards",
                     "steps", "accepted", "drafted", "target_only_drafts", "slot_steps", "live_steps", "cache_slots",
                     "kept_slots", "prefills"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("reached", "accepted_k", "expected_k"):
            setattr(self, name, [a + b for a, b in zip(getattr(self, name), getattr(other, name), strict=True)])
        return self

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode phase alone (prefill excluded): the rate the speed model's
        per-step forward costs describe (DESIGN §8)."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def alpha(self) -> list[float]:
        return [a / r if r else 0.0 for a, r in zip(self.accepted_k, self.reached, strict=True)]

    @property
    def expected_alpha(self) -> list[float]:
        return [e / r if r else 0.0 for e, r in zip(self.expected_k, self.reached, strict=True)]

    @property
    def accept_length(self) -> float:
        """Mean tokens emitted per verify step per row (accepted drafts + 1 correction/bonus token)."""
        return 1.0 + self.accepted / self.steps if self.steps else 1.0

    @property
    def utilization(self) -> float | None:
        """Live rows ÷ batch slots per decode forward (None where not counted)."""
        return self.live_steps / self.slot_steps if self.slot_steps else None

    @property
    def slots_per_token(self) -> float | None:
        """Cache slots a live row attends to per slot of its own context: 1 for a cache without holes or padding;
        rejected drafts, left padding and other rows' longer contexts add to it (None where not counted)."""
        return self.cache_slots / self.kept_slots if self.kept_slots else None

    @property
    def mean_gamma(self) -> float:
        return self.drafted / self.steps if self.steps else 0.0

    @property
    def target_only_fraction(self) -> float:
        return self.target_only_drafts / self.drafted if self.drafted else 0.0

    def to_dict(self) -> dict:
        return {
            "gamma": self.gamma, "mean_gamma": self.mean_gamma, "target_only_fraction": self.target_only_fraction,
            "tokens": self.tokens, "seconds": self.seconds, "decode_seconds": self.decode_seconds,
            "decode_tokens": self.decode_tokens, "decode_tokens_per_s": self.decode_tokens_per_s,
            "tokens_per_s": self.tokens_per_s, "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards, "alpha": self.alpha, "expected_alpha": self.expected_alpha,
            "accept_length": self.accept_length, "accept_length_counts_bonus": True,
            "utilization": self.utilization, "slots_per_token": self.slots_per_token, "prefills": self.prefills,
        }


def _concat_rows(a: dict[str, list], b: dict[str, list]) -> dict[str, list]:
    """Per-row counters of two calls' requests, one after the other (only the keys both kept)."""
    if not a or not b:
        return {k: list(v) for k, v in (a or b).items()}
    return {k: a[k] + b[k] for k in ROW_KEYS if k in a and k in b}


def _add_rows(a: dict[str, list], b: dict[str, list]) -> dict[str, list]:
    """Per-row counters of the same requests added (a key only one side kept is taken as it is)."""
    def add(x, y):
        return [add(u, v) for u, v in zip(x, y, strict=True)] if isinstance(x, list) else x + y

    return {k: add(a[k], b[k]) if k in a and k in b else list(a.get(k, b.get(k))) for k in ROW_KEYS
            if k in a or k in b}


def acceptance_counts(gamma: int, history: list[tuple], n_rows: int | None = None,
                      tokens: torch.Tensor | None = None) -> DecodeMetrics:
    """The acceptance counters of verify steps, totals and per request, as a ``DecodeMetrics`` to ``merge``.

    ``history`` holds per step (accepted [B], done before the step [B], expected α [B, γ_t], γ_t, TO drafts per row
    [B] or None, the request of each batch row [B] or None = row b is request b), counted over the rows live at
    that step (drafter quality, before EOS/max-token truncation); γ_t ≤ ``gamma``. ``n_rows`` requests (default
    the batch); ``tokens``: each request's emitted tokens [n_rows], kept with them. One host read for everything."""
    m = DecodeMetrics(gamma=gamma)
    G = gamma
    B = history[0][0].shape[0] if history else 0
    N = n_rows if n_rows is not None else (tokens.shape[0] if tokens is not None else B)
    device = history[0][0].device if history else (tokens.device if tokens is not None else None)
    rows = torch.zeros((N, 4 + 3 * G), device=device)       # per request: steps, accepted, drafted, TO, 3 × [γ]
    if history:
        a, done = torch.stack([h[0] for h in history]), torch.stack([h[1] for h in history])   # [S, B]
        exp = torch.stack([h[2] if h[3] == G else F.pad(h[2], (0, G - h[3])) for h in history])  # [S, B, γ]
        gam = torch.tensor([h[3] for h in history], device=device)                              # [S]
        if all(h[4] is None for h in history):
            to = torch.zeros_like(a)
        else:
            to = torch.stack([h[4] if h[4] is not None else torch.zeros_like(a[0]) for h in history])
        ident = torch.arange(B, device=device)
        req = torch.stack([h[5] if len(h) > 5 and h[5] is not None else ident for h in history])  # [S, B]
        live = ~done
        k = torch.arange(G, device=device)
        reached = (a[..., None] >= k) & (k < gam[:, None, None]) & live[..., None]  # draft k+1 was judged
        per_step = torch.cat([torch.stack([live, a * live, gam[:, None] * live, to * live], -1).float(),
                              reached.float(), ((a[..., None] > k) & live[..., None]).float(), exp * reached], -1)
        rows.index_add_(0, req.reshape(-1), per_step.reshape(-1, per_step.shape[-1]))
    if tokens is not None:
        rows = torch.cat([rows, tokens.to(rows.device, rows.dtype)[:, None]], 1)
    host = rows.tolist()                                                       # the one host read
    steps, acc, drafted, to_d = ([int(r[i]) for r in host] for i in range(4))
    m.steps, m.accepted, m.drafted, m.target_only_drafts = sum(steps), sum(acc), sum(drafted), sum(to_d)
    per_k = [[r[4 + j * G: 4 + (j + 1) * G] for r in host] for j in range(3)]
    m.reached, m.accepted_k, m.expected_k = ([sum(col) for col in zip(*rk, strict=True)] if rk else [0.0] * G
                                             for rk in per_k)
    m.per_row = {"steps": steps, "accepted": acc, "drafted": drafted, "reached": per_k[0], "accepted_k": per_k[1],
                 "expected_k": per_k[2]}
    if tokens is not None:
        m.per_row["tokens"] = [int(r[-1]) for r in host]
        m.tokens = sum(m.per_row["tokens"])
    return m
