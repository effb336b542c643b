"""The CLI: help, check-config, and one-line errors for bad flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from shieldproxy.cli import cli

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "shieldproxy.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=30,
        check=False,
    )


def test_help_lists_commands_and_serve_flags() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "serve" in result.output and "check-config" in result.output
    serve_help = runner.invoke(cli, ["serve", "--help"]).output
    for flag in ("--config", "--upstream", "--listen", "--admin-listen", "--store", "--workers",
                 "--data-dir", "--geoip", "--log-level"):  # fmt: skip
        assert flag in serve_help


def test_check_config_ok_on_the_example_file() -> None:
    result = CliRunner().invoke(cli, ["check-config", "--config", str(ROOT / "shieldproxy.toml")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("config OK")


def test_check_config_lists_every_error_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nlistne = "x"\nworkers = 0\n')
    result = run_cli("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "shieldproxy: server.workers: must be >= 1",
        "shieldproxy: server.listne: unknown key (did you mean 'listen'?)",
    ]


def test_bad_flag_value_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--workers", "lots", cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "'lots' is not a valid integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_flag_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--upstreem", "http://x", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("shieldproxy: No such option '--upstreem'")
    assert "--upstream" in lines[0] and lines[0].endswith("(try 'shieldproxy serve --help')")


def test_serve_with_invalid_flag_config_exits_1(tmp_path: Path) -> None:
    result = run_cli("serve", "--upstream", "not a url", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "shieldproxy: upstream.url: must be an http:// or https:// URL with a host"
    )
