"""Store URLs: credentials, TLS options and seed lists parsed up front, with one-line errors
that never show the password."""

from __future__ import annotations

from pathlib import Path

import pytest

from shieldproxy.store.urls import parse_redis_url, redact


def test_standalone_defaults_and_database() -> None:
    target = parse_redis_url("redis://cache.internal")
    assert target.nodes == (("cache.internal", 6379),) and not target.cluster
    assert target.options == {}
    assert parse_redis_url("redis://127.0.0.1:6380/3").options == {"db": 3}
    assert parse_redis_url("redis://[::1]:7000/0").nodes == (("::1", 7000),)


def test_credentials_are_percent_decoded() -> None:
    target = parse_redis_url("redis://app:p%40ss%3Aw%2Fd@h:1/0")
    assert target.options == {"username": "app", "password": "p@ss:w/d"}
    assert parse_redis_url("redis://:only-password@h:1").options == {"password": "only-password"}


def test_cluster_seeds_take_the_same_credentials_and_tls(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed here")
    target = parse_redis_url(
        f"rediss+cluster://app:pw@10.0.0.1:7000,10.0.0.2:7001/?ssl_ca_certs={ca}"
        "&ssl_check_hostname=false"
    )
    assert target.cluster
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert target.options == {
        "username": "app",
        "password": "pw",
        "ssl": True,
        "ssl_ca_certs": str(ca),
        "ssl_check_hostname": False,
    }


def test_no_verification_turns_hostname_matching_off() -> None:
    options = parse_redis_url("rediss://h:1?ssl_cert_reqs=none").options
    assert options == {"ssl": True, "ssl_cert_reqs": "none", "ssl_check_hostname": False}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://:hunter2@h:1?ssl_ca_cert=/x", "unknown option 'ssl_ca_cert'"),
        ("redis://:hunter2@h:1?ssl_ca_certs=/etc/hostname", "needs TLS"),
        ("rediss://:hunter2@h:1?ssl_ca_certs=/no/such/file", "is not a readable file"),
        ("rediss://:hunter2@h:1?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
        ("rediss://:hunter2@h:1?ssl_check_hostname=perhaps", "must be true or false"),
        ("redis+cluster://:hunter2@h:1,h:2/1", "database 0 only"),
        ("redis+cluster://:hunter2@h:1,h", "host:port,host:port"),
        ("redis://:hunter2@h1:1,h2:2", r"several hosts need redis\+cluster://"),
        ("redis://:hunter2@h:99999", "bad host or port"),
        ("redis://:hunter2@:1", "bad host or port"),
        ("redis://:hunter2@h:1/zero", "the path must be a database number"),
        ("redis://:@h:1", "empty credentials"),
        ("mongodb://:hunter2@h:1", "the scheme must be one of"),
    ],
)
def test_bad_urls_fail_in_one_line_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_redis_url(url)
    text = str(info.value)
    assert "\n" not in text and "hunter2" not in text


def test_redact() -> None:
    assert redact("redis://app:hunter2@h:1/0") == "redis://app:***@h:1/0"
    assert redact("rediss+cluster://:p%40ss@a:1,b:2?x=1") == "rediss+cluster://:***@a:1,b:2?x=1"
    assert redact("redis://h:1/0") == "redis://h:1/0"
    assert redact("redis://hunter2@h:1/0") == "redis://:***@h:1/0"  # a lone userinfo may be one
    assert redact("redis://h:1/0?password=hunter2&a=b") == "redis://h:1/0?password=***&a=b"
    assert redact("local") == "local"


def test_at_and_colon_may_stand_unencoded_in_a_password() -> None:
    options = parse_redis_url("redis://app:p@ss:w0rd@h:1/0").options
    assert options == {"username": "app", "password": "p@ss:w0rd"}


@pytest.mark.parametrize("separator", ["/", "?", "#"])
def test_a_password_that_would_end_the_host_is_refused_without_showing_it(separator: str) -> None:
    url = f"redis://app:hun{separator}ter2@redis.internal:6379/0"
    with pytest.raises(ValueError, match="must be percent-encoded") as info:
        parse_redis_url(url)
    assert "hun" not in str(info.value) and "ter2" not in str(info.value)
    assert "hun" not in redact(url) and "ter2" not in redact(url)


def test_an_option_named_like_a_password_is_not_shown() -> None:
    with pytest.raises(ValueError, match="unknown option 'password'") as info:
        parse_redis_url("redis://h:1/0?password=hunter2")
    assert "hunter2" not in str(info.value)
