"""Rate-limit rule and hit values: what to limit, by which scope and algorithm, at what cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["ip", "ip_prefix", "key", "tenant", "route", "global"]
# "quota" is not user-configurable: quota rules come only from API keys and tenant plans.
Strategy = Literal[
    "fixed_window", "sliding_window", "sliding_log", "token_bucket", "concurrency", "quota"
]
OnStoreError = Literal["local", "open", "closed"]


@dataclass(frozen=True, slots=True)
class LimitRule:
    """One limit as configured; validated by config, trusted here."""

    name: str  # policy name, appears in RateLimit headers
    scope: Scope
    strategy: Strategy
    # requests per window; for concurrency the max in flight; for token_bucket the refill per
    # window; for quota the requests per billing period
    requests: int
    window_seconds: float  # for concurrency: lease length; for quota: the period's length

    burst: int | None = None  # token_bucket ceiling (default = requests)
    # count "would deny", never deny; for quota: overage allowed and counted past the limit
    shadow: bool = False
    on_store_error: OnStoreError = "local"
    # quota only: when this billing period ends (epoch seconds, wall clock, UTC). The period's
    # identity is in the hit's subject ("<id>@<period start>"), so a new period is a new counter.
    period_end: float = 0.0

    @property
    def window_ms(self) -> int:
        # Whole milliseconds are the unit both the Lua scripts and the Python twins compute in.
        return max(1, round(self.window_seconds * 1000))

    @property
    def ceiling(self) -> int:
        """The most a fresh subject can spend at once (token_bucket burst, else requests)."""
        if self.strategy == "token_bucket" and self.burst is not None:
            return self.burst
        return self.requests


# Built several times per request: not frozen, because a frozen dataclass pays
# object.__setattr__ per field (~0.9 µs more per instance). Treat it as immutable.
@dataclass(slots=True)
class Hit:
    """One rule applied to one request."""

    rule: LimitRule
    # The scope value resolved by the pipeline: client ip, "2001:db8::/64", key id, tenant id,
    # route name, "" for global.
    subject: str
    cost: int = 1
