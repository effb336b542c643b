"""Redis store URLs: what they may say, checked before any connection is made.

Why here and not in redis-py's `from_url`: redis-py takes any query word as a connection
argument, so a typo (`ssl_ca_cert=`) surfaces as a TypeError on the first request, a missing
CA file as a failed handshake per connection, and it has no URL form for a cluster's seed list
at all. Managed Redis (ElastiCache, Memorystore, Redis Cloud) needs a password and TLS, on
standalone and cluster alike, so both forms take the same userinfo and the same TLS options,
under redis-py's own names so that its documentation applies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")
_DEFAULT_PORT = 6379
_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_TLS_OPTIONS = frozenset({*_FILES, "ssl_cert_reqs", "ssl_check_hostname"})
_CERT_REQS = ("none", "optional", "required")
_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class RedisTarget:
    """Where a Redis store lives and how to log in: keyword arguments for redis-py."""

    nodes: tuple[tuple[str, int], ...]  # one for standalone; the seed list for a cluster
    cluster: bool
    options: dict[str, Any] = field(default_factory=dict)  # username, password, db, ssl...


def _split(rest: str) -> tuple[str | None, str]:
    """(userinfo or None, the rest after it). The last '@' ends the userinfo, so '@' and ':'
    may stand unencoded in a password; '/', '?' and '#' may not (they would end the host)."""
    userinfo, at, after = rest.rpartition("@")
    return (userinfo, after) if at else (None, rest)


def _ambiguous(userinfo: str) -> bool:
    return any(c in userinfo for c in "/?#")


def redact(url: str) -> str:
    """The URL without its secrets, for messages and logs: the password (or a lone userinfo,
    which may be one) and the values of options named like passwords."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, after = _split(rest)
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        shown = user if colon and not _ambiguous(user) else ""  # without ':' it may be one
        after = f"{shown}:***@{after}"
    head, question, query = after.partition("?")
    if question:
        masked = [
            f"{name}=***" if "pass" in name.lower() else f"{name}={value}"
            for name, _, value in (item.partition("=") for item in query.split("&"))
        ]
        after = f"{head}?{'&'.join(masked)}"
    return f"{scheme}://{after}"


def parse_redis_url(url: str) -> RedisTarget:
    """`redis[s]://[user[:password]@]host[:port][/db][?tls options]`, or the same with
    `+cluster` and `host:port,host:port` seeds. ValueError (one line, no password) if wrong."""
    shown = redact(url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"store url {shown!r}: the scheme must be one of {', '.join(SCHEMES)}")
    cluster = scheme.endswith("+cluster")
    tls = scheme.startswith("rediss")
    userinfo, rest = _split(rest)
    options: dict[str, Any] = {}
    if userinfo is not None:
        if _ambiguous(userinfo):
            # Quoting any of it could show part of the password.
            raise ValueError(
                f"store url ({scheme}://): '/', '?' and '#' in a user name or password, and "
                "'@' anywhere after it, must be percent-encoded (%2F, %3F, %23, %40)"
            )
        user, has_password, password = userinfo.partition(":")
        if user:
            options["username"] = unquote(user)
        if has_password and password:
            options["password"] = unquote(password)
        elif not user:
            raise ValueError(f"store url {shown!r}: empty credentials before '@'")
    rest, _, query = rest.partition("?")
    rest, _, _fragment = rest.partition("#")
    hosts, _, path = rest.partition("/")
    nodes = tuple(_node(part, shown, cluster=cluster) for part in hosts.split(","))
    if not cluster and len(nodes) != 1:
        raise ValueError(
            f"store url {shown!r}: several hosts need {scheme}+cluster://host:port,host:port"
        )
    db = _database(path, shown, cluster=cluster)
    if db:
        options["db"] = db
    for name, value in parse_qsl(query, keep_blank_values=True):
        options[name] = _option(name, value, shown, tls=tls)
    if tls:
        options["ssl"] = True
        if options.get("ssl_cert_reqs") == "none":
            options.setdefault("ssl_check_hostname", False)  # nothing verified, nothing to match
    return RedisTarget(nodes=nodes, cluster=cluster, options=options)


def _node(part: str, shown: str, *, cluster: bool) -> tuple[str, int]:
    host, port = part.strip(), ""
    if host.startswith("["):  # [IPv6]:port
        close = host.find("]")
        if close < 0:
            host = ""
        else:
            host, port = host[1:close], host[close + 1 :].removeprefix(":")
    elif ":" in host:
        host, _, port = host.rpartition(":")
    if cluster and not port:
        raise ValueError(f"store url {shown!r}: cluster nodes must be host:port,host:port")
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        example = "host:port,host:port" if cluster else "redis://127.0.0.1:6379/0"
        raise ValueError(f"store url {shown!r}: bad host or port {part!r}, e.g. {example}")
    return unquote(host), int(port) if port else _DEFAULT_PORT


def _database(path: str, shown: str, *, cluster: bool) -> int:
    path = path.strip("/")
    if not path:
        return 0
    if not path.isdigit():
        raise ValueError(f"store url {shown!r}: the path must be a database number, not {path!r}")
    if cluster and int(path) != 0:
        raise ValueError(f"store url {shown!r}: a Redis Cluster has database 0 only")
    return int(path)


def _option(name: str, value: str, shown: str, *, tls: bool) -> Any:
    if name not in _TLS_OPTIONS:
        known = ", ".join(sorted(_TLS_OPTIONS))
        raise ValueError(f"store url {shown!r}: unknown option {name!r} (known: {known})")
    if not tls:
        raise ValueError(f"store url {shown!r}: {name} needs TLS (rediss:// or rediss+cluster://)")
    if name in _FILES:
        if not Path(value).is_file() or not os.access(value, os.R_OK):
            raise ValueError(f"store url {shown!r}: {name} {value!r} is not a readable file")
        return value
    if name == "ssl_cert_reqs":
        if value not in _CERT_REQS:
            raise ValueError(f"store url {shown!r}: ssl_cert_reqs must be one of {_CERT_REQS}")
        return value
    if value.lower() not in _BOOLEANS:
        raise ValueError(f"store url {shown!r}: {name} must be true or false, not {value!r}")
    return _BOOLEANS[value.lower()]
