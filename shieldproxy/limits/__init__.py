"""Rate limiting: rule model, key naming, algorithms, the RateLimiter engine and its headers."""

from __future__ import annotations

from shieldproxy.limits.engine import (
    Lease,
    LimiterSettings,
    LimiterStats,
    LimitState,
    RateLimiter,
    Verdict,
)
from shieldproxy.limits.headers import rate_limit_headers
from shieldproxy.limits.model import Hit, LimitRule, OnStoreError, Scope, Strategy

__all__ = [
    "Hit",
    "Lease",
    "LimitRule",
    "LimitState",
    "LimiterSettings",
    "LimiterStats",
    "OnStoreError",
    "RateLimiter",
    "Scope",
    "Strategy",
    "Verdict",
    "rate_limit_headers",
]
