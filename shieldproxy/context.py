"""RequestContext: the facts about one request, each written by exactly one check."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp.web import BaseRequest

    from shieldproxy.decision import Decision
    from shieldproxy.errors import ShieldError
    from shieldproxy.keys.records import KeyView
    from shieldproxy.limits.engine import Verdict
    from shieldproxy.limits.model import Hit, LimitRule
    from shieldproxy.routes import Route


class RequestContext:
    """Per-request facts. Slots keep it small; each field names the check that sets it."""

    __slots__ = (
        "client_ip",
        "decision",
        "extra_limits",
        "key",
        "key_id",
        "key_source",
        "limit_hits",
        "limit_verdict",
        "path",
        "peer_ip",
        "peer_trusted",
        "query",
        "request",
        "request_id",
        "response_fields",
        "response_headers",
        "route",
        "sent_status",
        "shadow_denials",
        "started",
        "tenant_id",
        "upstream_charge",
        "upstream_error",
    )

    def __init__(self, request: BaseRequest, request_id: str, started: float) -> None:
        self.request = request
        self.request_id = request_id  # handler: generated, or kept from a trusted proxy
        self.started = started  # handler: loop time at arrival
        self.path = ""  # checks.request_target: canonical path (matching and forwarding)
        self.query = ""  # checks.request_target: raw query string, without "?"
        self.client_ip = ""  # checks.client_ip: the real client address
        self.peer_ip = ""  # checks.client_ip: the socket peer, normalised
        self.peer_trusted = False  # checks.client_ip: the socket peer is a trusted proxy
        self.route: Route | None = None  # checks.route: the matched [[routes]] entry
        self.key: KeyView | None = None  # checks.api_key: the authenticated key
        self.key_id = ""  # checks.api_key: id of the authenticated key
        self.key_source = ""  # checks.api_key: authorization | x-api-key | query
        self.tenant_id = ""  # checks.api_key: the key's tenant
        # checks.api_key: the key's and its plan's limits and quotas, as (rule, subject)
        self.extra_limits: tuple[tuple[LimitRule, str | None], ...] = ()
        self.limit_hits: list[Hit] | None = None  # checks.rate_limit: limits applied
        self.limit_verdict: Verdict | None = None  # checks.rate_limit: their outcome
        self.decision: Decision | None = None  # handler: a fault's answer, when one happened
        self.shadow_denials: list[Decision] | None = None  # pipeline: "would deny" results
        self.response_headers: list[tuple[str, str]] | None = None  # checks: added to response
        # checks.rate_limit: more of them, already rendered as header lines (one field per
        # line, each ending in CRLF) by limits.headers.ReserveFields, from parts that are safe
        # by construction: the one-write answer sends them as they are, unchecked. Anything
        # else comes as a pair (response_headers), so that it meets the checks that refuse
        # line ends and control bytes.
        self.response_fields = ""
        self.upstream_charge = 0  # forwarder: units the upstream reported (charge_header)
        self.sent_status = 0  # forwarder: status of a streamed answer once its head is sent
        self.upstream_error: ShieldError | None = None  # forwarder: fault after headers were sent

    def add_response_headers(self, headers: list[tuple[str, str]]) -> None:
        if self.response_headers is None:
            self.response_headers = headers
        else:
            self.response_headers.extend(headers)

    def added_headers(self) -> list[tuple[str, str]]:
        """Every added field as a (name, value) pair, for the paths that build a header map:
        the rendered lines parsed back, then response_headers."""
        pairs = [
            (name, value)
            for name, _, value in (
                line.partition(": ") for line in self.response_fields.split("\r\n")[:-1]
            )
        ]
        if self.response_headers:
            pairs += self.response_headers
        return pairs
