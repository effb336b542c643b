"""Admin API request and response bodies; they also generate /openapi.json.

Requests forbid unknown fields, so a typo is a 422 naming the field, never silently ignored.
Secrets appear in exactly two responses: key creation and rotation (`KeyWithSecret`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Scope = Literal["read", "write", "admin"]
Strategy = Literal["fixed_window", "sliding_window", "sliding_log", "token_bucket", "concurrency"]
Name = Annotated[str, Field(min_length=1, max_length=200)]
Metadata = Annotated[dict[str, str | int | float | bool | None], Field(max_length=50)]
Timestamp = Annotated[float, Field(description="seconds since the Unix epoch (UTC)")]


def _read_only() -> list[Scope]:
    return ["read"]


def _not_null(schema: dict[str, Any]) -> None:
    """Document a PATCH field that may be left out but not set to `null`."""
    options = [option for option in schema.pop("anyOf", ()) if option != {"type": "null"}]
    if len(options) == 1:
        schema.update(options[0])
    schema.pop("default", None)


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limit(Request):
    """One rate limit of a key (its own counters, scope `key`)."""

    strategy: Strategy = "sliding_window"
    requests: int = Field(gt=0, le=10**9)
    window_seconds: float = Field(gt=0, le=366 * 86400)
    burst: int | None = Field(None, gt=0, le=10**9, description="token_bucket ceiling")

    @model_validator(mode="after")
    def _burst_fits(self) -> Limit:
        if self.burst is not None and self.strategy != "token_bucket":
            raise ValueError("burst is only meaningful with strategy 'token_bucket'")
        return self


class Quota(Request):
    monthly_requests: int = Field(gt=0, le=10**12)


class KeyCreate(Request):
    name: Name
    tenant_id: str | None = None
    scopes: list[Scope] = Field(default_factory=_read_only, max_length=3)
    rate_limit: Limit | None = None
    rate_limits: list[Limit] | None = Field(None, max_length=10)
    quota: Quota | None = None
    expires_at: Timestamp | None = None
    expires_in_seconds: int | None = Field(None, gt=0, le=10 * 366 * 86400)
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_of_each(self) -> KeyCreate:
        if self.rate_limit is not None and self.rate_limits is not None:
            raise ValueError("give rate_limit or rate_limits, not both")
        if self.expires_at is not None and self.expires_in_seconds is not None:
            raise ValueError("give expires_at or expires_in_seconds, not both")
        return self

    def limits(self) -> list[Limit]:
        if self.rate_limit is not None:
            return [self.rate_limit]
        return list(self.rate_limits or [])


class KeyUpdate(Request):
    """PATCH: only the fields given change; `null` clears an optional field.

    `name` and `scopes` cannot be cleared: for them `None` only means "not given", the API
    answers 422 to a `null`, and the schema does not offer one.
    """

    name: Name | None = Field(None, json_schema_extra=_not_null)
    scopes: list[Scope] | None = Field(None, max_length=3, json_schema_extra=_not_null)
    rate_limits: list[Limit] | None = Field(None, max_length=10)
    quota: Quota | None = None
    expires_at: Timestamp | None = None
    metadata: Metadata | None = None


class KeyRotate(Request):
    grace_seconds: int = Field(0, ge=0, le=30 * 86400, description="old secret keeps working")


class Key(BaseModel):
    """A key as stored and shown: never the secret, only its prefix and last four."""

    id: str
    name: str
    tenant_id: str | None
    prefix: str
    last4: str
    scopes: list[Scope]
    rate_limits: list[Limit]
    quota: Quota | None
    expires_at: Timestamp | None
    metadata: dict[str, Any]
    status: Literal["active", "revoked", "expired"]
    created_at: Timestamp
    updated_at: Timestamp
    last_used_at: Timestamp | None
    rotated_at: Timestamp | None = None
    previous_valid_until: Timestamp | None = Field(
        None, description="the pre-rotation secret works until then"
    )


class KeyWithSecret(Key):
    key: str = Field(description="the secret; shown only on create and rotate")


class KeyPage(BaseModel):
    items: list[Key]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")


class LimitUsage(BaseModel):
    name: str
    strategy: str
    limit: int
    remaining: int
    reset_seconds: float


class KeyUsage(BaseModel):
    key_id: str
    limits: list[LimitUsage]
    quota_limit: int | None
    quota_used: int | None
    quota_period_start: Timestamp | None
    quota_period_end: Timestamp | None
    last_used_at: Timestamp | None


class TenantCreate(Request):
    name: Name
    plan: str = Field(min_length=1, max_length=64)
    anchor_day: int = Field(1, ge=1, le=28, description="billing month starts on this day")
    metadata: Metadata = Field(default_factory=dict)


class TenantUpdate(Request):
    """PATCH: only the fields given change; `metadata: null` clears it, others need a value."""

    name: Name | None = Field(None, json_schema_extra=_not_null)  # None: not given
    plan: str | None = Field(None, min_length=1, max_length=64, json_schema_extra=_not_null)
    anchor_day: int | None = Field(None, ge=1, le=28, json_schema_extra=_not_null)
    metadata: Metadata | None = None


class Tenant(BaseModel):
    id: str
    name: str
    plan: str
    anchor_day: int
    metadata: dict[str, Any]
    created_at: Timestamp
    updated_at: Timestamp


class TenantPage(BaseModel):
    items: list[Tenant]
    next_cursor: str | None


class PlanLimit(BaseModel):
    name: str
    scope: str
    strategy: str
    requests: int
    window_seconds: float
    burst: int | None


class Plan(BaseModel):
    name: str
    limits: list[PlanLimit]
    monthly_quota: int
    overage: Literal["block", "allow"]
    price_monthly_cents: int
    price_per_1k_overage_cents: int


class AuditEntry(BaseModel):
    id: str
    at: Timestamp
    actor: str = Field(description="admin token id (a fingerprint, never the token)")
    ip: str
    action: str = Field(description="e.g. key.create, key.rotate, tenant.update")
    target: str = Field(description="the id of what changed")
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class AuditPage(BaseModel):
    items: list[AuditEntry]
    next_cursor: str | None


class Query(BaseModel):
    """Query parameters: the first value of each wins; unknown parameters are ignored.

    `None` means "not given" (the OpenAPI document drops the `null` a query string cannot carry).
    """

    model_config = ConfigDict(extra="ignore")


class PageQuery(Query):
    limit: int = Field(50, ge=1, le=200, description="page size")
    cursor: str | None = Field(
        None, max_length=200, description="next_cursor of the previous page (opaque)"
    )


class KeyQuery(PageQuery):
    tenant_id: str | None = Field(None, description="only this tenant's keys")
    status: Literal["active", "revoked", "expired"] | None = None


class AuditQuery(Query):
    since: str | None = Field(
        None,
        pattern=r"^[0-9]{1,18}(-[0-9]{1,18})?$",
        description="next_cursor of the previous page: entries strictly after it",
    )
    limit: int = Field(50, ge=1, le=200, description="page size")
    action: str | None = Field(None, description="e.g. key.rotate")
    target: str | None = Field(None, description="a key or tenant id")
    actor: str | None = Field(None, description="an admin token id (adm_...)")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
