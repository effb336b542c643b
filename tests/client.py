"""A tiny blocking HTTP client for tests (stdlib http.client: no extra dependency)."""

from __future__ import annotations

import http.client
import json
import re
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def get(port: int, path: str, **kwargs: Any) -> Reply:
    return request(port, "GET", path, **kwargs)


def client_timeouts(admin_port: int, token: str, kind: str) -> float:
    """shieldproxy_client_timeouts_total{kind} from the admin API's /metrics (0 if absent)."""
    text = get(admin_port, "/metrics", headers={"Authorization": f"Bearer {token}"}).body.decode()
    pattern = rf'^shieldproxy_client_timeouts_total\{{kind="{kind}"\}} (\S+)$'
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0
