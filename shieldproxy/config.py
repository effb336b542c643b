"""One frozen, validated Config from defaults < shieldproxy.toml < SHIELDPROXY_* env < CLI flags."""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from shieldproxy.keys.secret import MIN_KEY_SECRET_BYTES
from shieldproxy.limits.model import LimitRule
from shieldproxy.store.urls import SCHEMES, parse_redis_url

ENV_PREFIX = "SHIELDPROXY_"
DEFAULT_CONFIG_FILE = "shieldproxy.toml"


class ConfigError(Exception):
    """Invalid configuration; `problems` holds one `dotted.path: message` line per error."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _split_csv(value: Any) -> Any:
    """Lets env vars and flags give lists as `a,b` as well as JSON arrays."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _check_host_port(value: str) -> str:
    split_host_port(value)
    return value


def split_host_port(value: str) -> tuple[str, int]:
    """`0.0.0.0:8080`, `[::1]:8080` or `localhost:8080` → (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be 1-65535 in {value!r}")
    return host, int(port_text)


StrList = Annotated[tuple[str, ...], BeforeValidator(_split_csv)]
HostPort = Annotated[str, BeforeValidator(_check_host_port)]
Seconds = Annotated[float, Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(Section):
    """The proxy listener, the admin listener and protocol limits."""

    listen: HostPort = Field("0.0.0.0:8080", description="proxy listener HOST:PORT")
    admin_listen: HostPort = Field("127.0.0.1:8081", description="admin API listener")
    trusted_proxies: StrList = Field((), description="CIDRs whose X-Forwarded-For is believed")
    workers: int = Field(1, ge=1, le=128, description="worker processes (SO_REUSEPORT)")
    data_dir: str = Field(".shieldproxy", description="admin token, SQLite store, run files")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_request_line_bytes: int = Field(8190, ge=256, le=65536, description="longer → 414")
    max_header_bytes: int = Field(32768, ge=1024, le=1048576, description="total; more → 431")
    max_header_count: int = Field(100, ge=8, le=1000, description="more headers → 431")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=0, description="0 = unlimited; more → 413")
    header_timeout_seconds: Seconds = Field(
        10.0, description="a request head still incomplete after this long → 408 and close"
    )
    keepalive_timeout_seconds: Seconds = Field(
        75.0, description="close a connection that sends nothing for this long"
    )
    body_timeout_seconds: Seconds = Field(30.0, description="silence inside a body → 408")
    send_timeout_seconds: Seconds = Field(
        60.0,
        description="a client that does not take the response bytes buffered for it (up to "
        "64 KiB) within this long (a stalled or very slow reader) is disconnected",
    )
    shutdown_timeout_seconds: Seconds = Field(30.0, description="drain budget on SIGTERM")
    drain_delay_seconds: float = Field(
        0.0,
        ge=0,
        le=300,
        description="on SIGTERM, /readyz fails this long before the listener closes",
    )
    reload_grace_seconds: Seconds = Field(
        60.0, description="after a reload, upstream connections in use this long are closed"
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP address or CIDR") from None
        return value


class UpstreamConfig(Section):
    """The one upstream API and the pooled connections to it."""

    url: str = Field("http://127.0.0.1:9000", description="http:// or https:// base URL")
    connect_timeout_seconds: Seconds = 2.0
    read_timeout_seconds: Seconds = Field(60.0, description="no response bytes this long → 504")
    max_connections: int = Field(1024, ge=1, description="open upstream connections at most")
    max_idle_connections: int = Field(256, ge=0, description="kept alive in the pool")
    idle_timeout_seconds: Seconds = Field(30.0, description="pooled connection idle lifetime")
    preserve_host: bool = Field(False, description="send the client's Host instead of upstream's")

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        from yarl import URL

        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        if url.query_string or url.fragment:
            raise ValueError("must not have a query or fragment")
        return value


class StoreConfig(Section):
    url: str = Field(
        "local",
        repr=False,  # may hold a password
        description="local | redis[s]://[user:password@]host:port/db | "
        "redis[s]+cluster://[user:password@]host:port,host:port (TLS options as query)",
    )
    prefix: str = Field("sp:", min_length=1, description="prefix of every Redis key")
    timeout_seconds: Seconds = Field(0.05, description="per storage call on the hot path")
    on_store_error: Literal["local", "open", "closed"] = "local"
    breaker_failures: int = Field(3, ge=1, description="consecutive failures that open the breaker")
    breaker_cooldown_seconds: Seconds = Field(1.0, description="open breaker: wait, then probe")

    @field_validator("url")
    @classmethod
    def _valid_store(cls, value: str) -> str:
        if value == "local":
            return value
        if not value.startswith(tuple(f"{scheme}://" for scheme in SCHEMES)):
            raise ValueError(
                "must be local, redis://..., rediss://..., redis+cluster://... "
                "or rediss+cluster://..."
            )
        parse_redis_url(value)  # ValueError: one line, password left out
        return value


class RateLimitsConfig(Section):
    """How limits are keyed and advertised (the rules themselves are [[limits]] and routes)."""

    expose_headers: bool = Field(True, description="send RateLimit-* headers to clients")
    legacy_headers: bool = Field(True, description="also send X-RateLimit-Limit/-Remaining/-Reset")
    ipv4_prefix_length: int = Field(32, ge=8, le=32, description="ip_prefix scope for IPv4")
    ipv6_prefix_length: int = Field(64, ge=16, le=128, description="ip_prefix scope for IPv6")
    charge_header: str = Field(
        "", description="upstream response header whose integer is debited after the response"
    )
    reserve_seconds: float = Field(
        0.1,
        ge=0,
        le=10,
        description="busy subjects: reserve this much of their traffic ahead from the store and "
        "admit from it without a round trip (never over-admits; unspent units go back); 0 = ask "
        "the store for every request",
    )
    reserve_min_limit: int = Field(
        1000, ge=1, description="limits below this many requests per window are never reserved"
    )


class AuthConfig(Section):
    """API keys: where they are read, how they are hashed, how long the cache may trust them."""

    required: bool = Field(True, description="a route may set auth = false")
    key_env: str = Field("live", pattern=r"^[a-z0-9]{1,8}$", description="the <env> in sp_<env>_")
    key_secret: SecretStr = Field(
        SecretStr(""), description="HMAC secret for key hashes (16+ bytes)"
    )
    key_secret_file: str = Field("", description="read key_secret from this file")
    query_parameter: str = Field("", description="also accept the key in ?<name>=; empty = off")
    cache_ttl_seconds: Seconds = Field(30.0, description="re-read a cached key after this long")
    max_stale_seconds: float = Field(
        600.0, ge=0, description="store down: keep honouring a cached key this long"
    )
    unknown_keys_per_minute: int = Field(
        60,
        ge=0,
        description="lookups of keys that do not exist, per client network; then 429; 0 = off",
    )

    @field_validator("key_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if 0 < len(value.get_secret_value()) < MIN_KEY_SECRET_BYTES:
            raise ValueError(f"must be at least {MIN_KEY_SECRET_BYTES} bytes, or empty")
        return value


class PlanConfig(Section):
    """A tenant plan: shared limits and a monthly quota for all of the tenant's keys."""

    limits: tuple[LimitConfig, ...] = ()
    monthly_quota: int = Field(0, ge=0, description="requests per billing month; 0 = none")
    overage: Literal["block", "allow"] = Field("block", description="past the quota: 429 or bill")
    price_monthly_cents: int = Field(0, ge=0, description="base price, for billing")
    price_per_1k_overage_cents: int = Field(0, ge=0, description="overage price, for billing")


class GeoConfig(Section):
    database: str = Field("", description="MaxMind .mmdb path; empty = geo off")
    allow_countries: StrList = ()
    deny_countries: StrList = ()
    unknown: Literal["allow", "deny"] = "allow"

    @field_validator("allow_countries", "deny_countries")
    @classmethod
    def _iso_codes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for code in value:
            if len(code) != 2 or not code.isalpha() or not code.isupper():
                raise ValueError(f"{code!r} is not an ISO 3166-1 alpha-2 code like 'DE'")
        return value


class AdminConfig(Section):
    token: SecretStr = Field(SecretStr(""), description="bearer token; empty = generated file")
    token_file: str = Field("", description="read the token from this file")


Strategy = Literal["fixed_window", "sliding_window", "sliding_log", "token_bucket", "concurrency"]


class LimitConfig(Section):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    scope: Literal["ip", "ip_prefix", "key", "tenant", "route", "global"] = "ip"
    strategy: Strategy = "sliding_window"
    requests: int = Field(gt=0)
    window_seconds: Seconds = 60.0
    burst: int | None = Field(None, gt=0, description="token_bucket ceiling")
    shadow: bool = Field(False, description='count "would deny", never deny')
    on_store_error: Literal["local", "open", "closed"] | None = None

    def to_rule(self, default_on_store_error: str) -> LimitRule:
        """The engine's rule; `on_store_error` unset means the [store] default."""
        return LimitRule(
            name=self.name,
            scope=self.scope,
            strategy=self.strategy,
            requests=self.requests,
            window_seconds=self.window_seconds,
            burst=self.burst,
            shadow=self.shadow,
            on_store_error=self.on_store_error or default_on_store_error,  # type: ignore[arg-type]
        )

    @model_validator(mode="after")
    def _burst_fits(self) -> LimitConfig:
        if self.burst is not None and self.strategy != "token_bucket":
            raise ValueError("burst is only meaningful with strategy = 'token_bucket'")
        return self


class RouteConfig(Section):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(description="exact, prefix/* or glob, matched on the canonical path")
    methods: StrList = Field((), description="empty = every method")
    scopes: tuple[Literal["read", "write", "admin"], ...] = ()
    cost: int = Field(1, ge=0)
    auth: bool | None = Field(None, description="None = [auth].required")
    limits: tuple[LimitConfig, ...] = ()

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("methods")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        methods = tuple(method.upper() for method in value)
        # Servers answer HEAD with their GET handler: a GET route's scopes and limits must
        # cover HEAD too, or HEAD would be a way around them.
        if "GET" in methods and "HEAD" not in methods:
            methods += ("HEAD",)
        return methods


class Config(Section):
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    store: StoreConfig = StoreConfig()
    rate_limits: RateLimitsConfig = RateLimitsConfig()
    auth: AuthConfig = AuthConfig()
    geo: GeoConfig = GeoConfig()
    admin: AdminConfig = AdminConfig()
    limits: tuple[LimitConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    plans: dict[str, PlanConfig] = {}

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        names = [limit.name for limit in self.limits] + [
            limit.name for route in self.routes for limit in route.limits
        ]
        for plan_name, plan in self.plans.items():
            if not plan_name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"plan name {plan_name!r}: use letters, digits, '-' and '_'")
            names += [limit.name for limit in plan.limits]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"limit names must be unique, repeated: {', '.join(duplicates)}")
        routes = [route.name for route in self.routes]
        repeated = sorted({name for name in routes if routes.count(name) > 1})
        if repeated:
            raise ValueError(f"route names must be unique, repeated: {', '.join(repeated)}")
        both = set(self.geo.allow_countries) & set(self.geo.deny_countries)
        if both:
            raise ValueError(f"geo: countries both allowed and denied: {', '.join(sorted(both))}")
        if self.store.url == "local" and self.server.workers > 1:
            raise ValueError(
                "server.workers > 1 needs a shared store: the local store keeps counters in one "
                "process; set store.url = 'redis://...'"
            )
        return self


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config from every source; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is None and (env_path := env.get(f"{ENV_PREFIX}CONFIG")):
        path = env_path
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        data = _read_toml(Path(path))
    for dotted, value in _env_values(env).items():
        _set_dotted(data, dotted, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    _resolve_secret_files(data)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(error) for error in exc.errors()]) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"config: {path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"config: {path}: cannot read: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config: {path}: invalid TOML: {exc}"]) from None


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    """SHIELDPROXY_SERVER__LISTEN=… → {"server.listen": …}; JSON for lists and tables."""
    values: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == f"{ENV_PREFIX}CONFIG":
            continue
        if name.startswith((f"{ENV_PREFIX}ADMIN_URL", f"{ENV_PREFIX}ADMIN_TOKEN")):
            continue  # CLI client settings, not server config
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        value: Any = raw
        if raw.lstrip().startswith(("[", "{")):
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise ConfigError([f"env {name}: invalid JSON"]) from None
        values[dotted] = value
    return values


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, key = dotted.split(".")
    target = data
    for section in sections:
        child = target.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError([f"{dotted}: {section} is not a table"])
        target = child
    target[key] = value


_SECRET_FILES = (("admin", "token"), ("auth", "key_secret"))


def _resolve_secret_files(data: dict[str, Any]) -> None:
    """`<name>_file` fills the secret `<name>` when the secret itself is not given."""
    for section_name, key in _SECRET_FILES:
        section = data.get(section_name)
        file_key = f"{key}_file"
        if isinstance(section, dict) and section.get(file_key) and not section.get(key):
            file_path = Path(str(section[file_key]))
            try:
                section[key] = file_path.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    [f"{section_name}.{file_key}: cannot read {file_path}: {exc.strerror}"]
                ) from None


_MESSAGES = {
    "missing": "is required",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
}


def _describe(error: Any) -> str:
    """One pydantic error → `limits[2].window_seconds: must be > 0`."""
    loc: tuple[Any, ...] = tuple(error["loc"])
    path = _dotted(loc)
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        hint = _did_you_mean(loc)
        return f"{path}: unknown key{hint}"
    if kind in _MESSAGES:
        message = _MESSAGES[kind]
    elif kind == "greater_than":
        message = f"must be > {_number(ctx['gt'])}"
    elif kind == "greater_than_equal":
        message = f"must be >= {_number(ctx['ge'])}"
    elif kind == "less_than_equal":
        message = f"must be <= {_number(ctx['le'])}"
    elif kind == "literal_error":
        message = f"must be one of {ctx['expected']}"
    elif kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    elif kind == "string_pattern_mismatch":
        message = "may only contain letters, digits, '_', '.' and '-'"
    else:
        message = error["msg"][0].lower() + error["msg"][1:]
    return f"{path or 'config'}: {message}"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _dotted(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    model: Any = Config
    skip_next = False
    for item in loc[:-1]:
        if isinstance(item, int) or skip_next:
            skip_next = False
            continue
        field = model.model_fields.get(item)
        if field is None:
            return ""
        annotation = field.annotation
        skip_next = getattr(annotation, "__origin__", None) is dict  # the next item is a name
        args = getattr(annotation, "__args__", ())
        model = next((arg for arg in (annotation, *args) if _is_model(arg)), None)
        if model is None:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_model(candidate: Any) -> bool:
    return isinstance(candidate, type) and issubclass(candidate, BaseModel)
