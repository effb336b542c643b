"""A tiny blocking client for the admin API (stdlib urllib: the CLI needs no extra dependency).

AdminClientError
 ├── AdminError        the API answered with a 4xx/5xx `{"error": {"code", "message"}}`
 └── AdminUnreachable  no answer at all: refused, DNS, timeout, TLS, connection reset
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

Query = Mapping[str, str | int | float | None]


class AdminClientError(Exception):
    """Base of everything the client raises."""


class AdminError(AdminClientError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class AdminUnreachable(AdminClientError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would replay the bearer token to wherever it points: surface it as an error."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class AdminClient:
    """`AdminClient(url, token).get("/v1/keys", query={"limit": 10})` → the decoded JSON body."""

    def __init__(self, url: str, token: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirects())

    def get(self, path: str, body: Any = None, query: Query | None = None) -> Any:
        return self.request("GET", path, body, query)

    def post(self, path: str, body: Any = None, query: Query | None = None) -> Any:
        return self.request("POST", path, body, query)

    def patch(self, path: str, body: Any = None, query: Query | None = None) -> Any:
        return self.request("PATCH", path, body, query)

    def delete(self, path: str, body: Any = None, query: Query | None = None) -> Any:
        return self.request("DELETE", path, body, query)

    def request(self, method: str, path: str, body: Any = None, query: Query | None = None) -> Any:
        url = self.url + path
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:  # before URLError/OSError: it is both
            with exc:
                raise _api_error(exc.code, exc.reason, exc.read()) from None
        except urllib.error.URLError as exc:
            raise AdminUnreachable(self.url, _reason(exc.reason)) from None
        except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
            raise AdminUnreachable(self.url, _reason(exc)) from None
        if status == 204 or not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise AdminError(status, "bad_response", "the admin API answered non-JSON") from None


def _reason(reason: object) -> str:
    """`connection refused`, not `[Errno 111] Connection refused`."""
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason) or type(reason).__name__


def _api_error(status: int, reason: str, raw: bytes) -> AdminError:
    try:
        error = json.loads(raw)["error"]
        return AdminError(status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return AdminError(status, f"http_{status}", str(reason) or "no error body")
