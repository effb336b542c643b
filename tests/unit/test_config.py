"""Config: layering, the example file, and one fixture file per error (exact message)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from shieldproxy.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
CASES = sorted((ROOT / "tests" / "config_cases").glob("*.toml"))


def expected_message(path: Path) -> tuple[str, bool]:
    first = path.read_text().splitlines()[0]
    if first.startswith("# expect-prefix: "):
        return first.removeprefix("# expect-prefix: ").replace("{path}", str(path)), True
    return first.removeprefix("# expect: "), False


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_config_case_reports_exact_error(case: Path) -> None:
    expected, prefix = expected_message(case)
    with pytest.raises(ConfigError) as caught:
        load_config(case, env={})
    problems = caught.value.problems
    if prefix:
        assert problems[0].startswith(expected), problems
    else:
        assert expected in problems, problems


def test_example_file_equals_defaults() -> None:
    assert load_config(ROOT / "shieldproxy.toml", env={}) == Config()


def _field_names(model: type[BaseModel]) -> set[str]:
    names = set(model.model_fields)
    for field in model.model_fields.values():
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                names |= _field_names(candidate)
    return names


def test_example_file_documents_every_key() -> None:
    text = (ROOT / "shieldproxy.toml").read_text()
    missing = sorted(name for name in _field_names(Config) if name not in text)
    assert not missing, f"shieldproxy.toml does not mention: {missing}"


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:1000"\nlog_level = "debug"\n')
    env = {
        "SHIELDPROXY_SERVER__LISTEN": "127.0.0.1:2000",
        "SHIELDPROXY_UPSTREAM__URL": "http://u:1",
    }
    config = load_config(path, env=env, overrides={"server.listen": "127.0.0.1:3000"})
    assert config.server.listen == "127.0.0.1:3000"  # flag beats env
    assert config.upstream.url == "http://u:1"  # env beats default
    assert config.server.log_level == "debug"  # file beats default
    assert config.server.workers == 1  # default


def test_env_lists_as_json_or_commas() -> None:
    config = load_config(
        None,
        env={
            "SHIELDPROXY_SERVER__TRUSTED_PROXIES": '["10.0.0.0/8", "192.168.1.1"]',
            "SHIELDPROXY_GEO__DENY_COUNTRIES": "RU, KP",
            "SHIELDPROXY_LIMITS": '[{"name": "per-ip", "requests": 5}]',
        },
    )
    assert config.server.trusted_proxies == ("10.0.0.0/8", "192.168.1.1")
    assert config.geo.deny_countries == ("RU", "KP")
    assert config.limits[0].requests == 5


def test_unknown_env_key_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"SHIELDPROXY_SERVER__WORKRS": "2"})
    assert caught.value.problems == ["server.workrs: unknown key (did you mean 'workers'?)"]


def test_secret_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    config = load_config(None, env={"SHIELDPROXY_ADMIN__TOKEN_FILE": str(secret)})
    assert config.admin.token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(config)


def test_missing_secret_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"SHIELDPROXY_ADMIN__TOKEN_FILE": str(tmp_path / "nope")})
    assert caught.value.problems[0].startswith("admin.token_file: cannot read")


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("/nonexistent/shieldproxy.toml", env={})
    assert caught.value.problems == ["config: /nonexistent/shieldproxy.toml: no such file"]


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nworkers = 0\n[upstream]\nconnect_timeout_seconds = 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.problems == [
        "server.workers: must be >= 1",
        "upstream.connect_timeout_seconds: must be > 0",
    ]


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(Exception, match="frozen"):
        config.server.workers = 4  # type: ignore[misc]


def test_get_routes_cover_head() -> None:
    """HEAD is answered by GET handlers upstream, so a GET route's scopes and limits apply."""
    config = load_config(
        None,
        env={"SHIELDPROXY_ROUTES": '[{"name": "r", "path": "/admin/*", "methods": ["GET"]}]'},
    )
    assert config.routes[0].methods == ("GET", "HEAD")
