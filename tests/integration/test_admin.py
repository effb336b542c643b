"""The admin listener: health, readiness, metrics, token handling."""

from __future__ import annotations

import stat
from collections.abc import Callable

from tests.client import get
from tests.fixtures.processes import Proxy

ProxyFactory = Callable[..., Proxy]


def test_healthz_and_readyz_need_no_token(proxy: Proxy) -> None:
    health = get(proxy.admin_port, "/healthz")
    assert health.status == 200 and health.json() == {"status": "ok"}
    ready = get(proxy.admin_port, "/readyz")
    assert ready.status == 200
    assert ready.json()["status"] == "ok" and ready.json()["degraded"] is False


def test_generated_token_file_is_private_and_logged(proxy: Proxy) -> None:
    path = proxy.data_dir / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(proxy.admin_token) > 30
    assert str(path) in proxy.log() and proxy.admin_token not in proxy.log()


def test_metrics_require_the_token(proxy: Proxy) -> None:
    denied = get(proxy.admin_port, "/metrics")
    assert denied.status == 401
    assert denied.json()["error"]["code"] == "unauthorized"
    assert denied.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = get(proxy.admin_port, "/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401


def test_metrics_count_requests_by_route_status_and_decision(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory('[[routes]]\nname = "items"\npath = "/v1/items/*"\nauth = false\n')
    assert get(proxy.port, "/v1/items/1").status == 200
    assert get(proxy.port, "/status/503").status == 503
    assert get(proxy.port, "/a/%2F/b").status == 400
    token = {"Authorization": f"Bearer {proxy.admin_token}"}
    text = get(proxy.admin_port, "/metrics", headers=token).body.decode()
    assert (
        'shieldproxy_requests_total{decision="allow",route="items",status_class="2xx"} 1.0' in text
    )
    assert (
        'shieldproxy_requests_total{decision="allow",route="unmatched",status_class="5xx"} 1.0'
        in text
    )
    assert 'shieldproxy_denials_total{reason="bad_request",route="unmatched"} 1.0' in text
    assert 'shieldproxy_request_duration_seconds_count{route="items"} 1.0' in text
    assert "shieldproxy_in_flight_requests 0.0" in text
    for forbidden in ("/v1/items/1", "127.0.0.1"):  # never labelled by path or IP
        assert forbidden not in text


def test_configured_token_and_failed_attempts_are_limited(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory('[admin]\ntoken = "correct-horse-battery-staple"\n')
    assert not (proxy.data_dir / "admin-token").exists()
    good = {"Authorization": "Bearer correct-horse-battery-staple"}
    assert get(proxy.admin_port, "/metrics", headers=good).status == 200
    statuses = [
        get(proxy.admin_port, "/metrics", headers={"Authorization": f"Bearer guess{i}"}).status
        for i in range(12)
    ]
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
    blocked = get(proxy.admin_port, "/metrics", headers=good)
    assert blocked.status == 429 and int(blocked.headers["Retry-After"]) >= 1


def test_unknown_admin_path_is_json_404(proxy: Proxy) -> None:
    reply = get(proxy.admin_port, "/nope", headers={"Authorization": f"Bearer {proxy.admin_token}"})
    assert reply.status == 404
    assert reply.json()["error"]["code"] == "not_found"
