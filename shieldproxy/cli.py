"""The `shieldproxy` command: flags become config overrides; no logic lives here."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from shieldproxy import __version__
from shieldproxy.cli_admin import COMMANDS as ADMIN_COMMANDS
from shieldproxy.config import ConfigError, load_config
from shieldproxy.store.urls import redact

_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


def _fail(problems: list[str]) -> NoReturn:
    for line in problems:
        click.echo(f"shieldproxy: {line}", err=True)
    sys.exit(1)


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="SHIELDPROXY_CONFIG",
    help="TOML config file (default: ./shieldproxy.toml if present).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shieldproxy")
def cli() -> None:
    """shieldproxy: API security and analytics gateway.

    Run `shieldproxy serve --upstream http://127.0.0.1:9000` to protect an API.
    """


@cli.command()
@_config_option
@click.option("--upstream", metavar="URL", help="Upstream API base URL.")
@click.option("--listen", metavar="HOST:PORT", help="Proxy listener [0.0.0.0:8080].")
@click.option("--admin-listen", metavar="HOST:PORT", help="Admin API listener [127.0.0.1:8081].")
@click.option("--store", metavar="URL", help="local | redis://... | redis+cluster://h:p,h:p")
@click.option("--workers", type=click.IntRange(1, 128), help="Worker processes [1].")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data dir [./.shieldproxy].")
@click.option("--geoip", type=click.Path(dir_okay=False), help="MaxMind .mmdb database.")
@click.option("--log-level", type=_LEVELS, help="Log level [info].")
def serve(config_path: str | None, **flags: Any) -> None:
    """Run the proxy (and its admin API) until SIGTERM or Ctrl-C."""
    from shieldproxy.server import ConfigSource
    from shieldproxy.server import serve as run

    overrides = {
        "upstream.url": flags["upstream"],
        "server.listen": flags["listen"],
        "server.admin_listen": flags["admin_listen"],
        "store.url": flags["store"],
        "server.workers": flags["workers"],
        "server.data_dir": flags["data_dir"],
        "geo.database": flags["geoip"],
        "server.log_level": flags["log_level"] and flags["log_level"].lower(),
    }
    try:
        code = run(ConfigSource(config_path, {k: v for k, v in overrides.items() if v is not None}))
    except ConfigError as exc:
        _fail(exc.problems)
    sys.exit(code)


@cli.command("check-config")
@_config_option
def check_config(config_path: str | None) -> None:
    """Validate the configuration offline (file + SHIELDPROXY_* env); exit 1 on errors."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(exc.problems)
    click.echo(
        f"config OK: upstream {config.upstream.url}, listen {config.server.listen}, "
        f"store {redact(config.store.url)}, {len(config.routes)} routes, "
        f"{len(config.limits)} limits"
    )


for _command in ADMIN_COMMANDS:
    cli.add_command(_command)


def main() -> None:
    """Entry point: usage errors become one line and exit code 2."""
    try:
        cli.main(prog_name="shieldproxy", standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (try '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"shieldproxy: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"shieldproxy: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()
