"""Resolve the real client IP: the socket peer, or X-Forwarded-For from a trusted proxy."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from functools import lru_cache

from aiohttp import hdrs
from multidict import istr

from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_X_REQUEST_ID = istr("X-Request-Id")  # an istr: looked up without case-folding it
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def normalize_ip(text: str) -> str | None:
    """Canonical text of an address (`::ffff:1.2.3.4` → `1.2.3.4`), or None if not an IP."""
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class ClientIpCheck:
    """Trust X-Forwarded-For only from `server.trusted_proxies`, read right to left.

    The right-most entry not added by one of our proxies is the client: everything left of
    it was written by the client itself and can be spoofed. A trusted proxy's X-Request-Id
    is kept so one id follows the request through every hop.
    """

    name = "client_ip"

    def __init__(self, trusted_proxies: tuple[str, ...]) -> None:
        self._networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in trusted_proxies
        )
        self.is_trusted = lru_cache(maxsize=4096)(self._is_trusted)

    def _is_trusted(self, ip: str) -> bool:
        if not self._networks:
            return False
        address = ipaddress.ip_address(ip)
        return any(address in network for network in self._networks)

    def decide(self, ctx: RequestContext) -> Decision:
        peer = _peer_ip(ctx.request.remote)
        ctx.peer_ip = peer
        if not self._networks or not self.is_trusted(peer):
            ctx.client_ip = peer
            return ALLOW
        ctx.peer_trusted = True
        ctx.client_ip = self._from_forwarded_for(ctx, peer)
        request_id = ctx.request.headers.get(_X_REQUEST_ID)
        if request_id is not None and _REQUEST_ID.fullmatch(request_id):
            ctx.request_id = request_id
        return ALLOW

    def _from_forwarded_for(self, ctx: RequestContext, peer: str) -> str:
        values = ctx.request.headers.getall(hdrs.X_FORWARDED_FOR, ())
        hops = [hop for value in values for hop in value.split(",")]
        client = peer
        for hop in reversed(hops):
            ip = normalize_ip(hop)
            if ip is None:
                break  # garbage can only come from the client side: stop at the last good hop
            client = ip
            if not self.is_trusted(ip):
                break
        return client


@lru_cache(maxsize=65536)
def _peer_ip(remote: str | None) -> str:
    if remote is None:
        return "0.0.0.0"  # unix socket or closed transport: no address to key on
    return normalize_ip(remote) or remote


def ip_prefixer(v4: int, v6: int) -> Callable[[str], str]:
    """Client IP → its network (IPv6 clients rotate addresses inside their /64)."""

    @lru_cache(maxsize=65536)
    def prefix(ip: str) -> str:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return ip
        length = v4 if address.version == 4 else v6
        return str(ipaddress.ip_network(f"{address}/{length}", strict=False))

    return prefix
