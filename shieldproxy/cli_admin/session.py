"""What every admin command shares: connection flags, the client, errors, paging."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from shieldproxy.admin_client import AdminClient, AdminError, AdminUnreachable
from shieldproxy.cli_admin.text import ADMIN_URL, DEFAULT_ADMIN_URL, DEFAULT_DATA_DIR

# --- connection and error handling shared by every command ----------------------------------


def _die(message: str, code: int) -> NoReturn:
    click.echo(f"shieldproxy: {message}", err=True)
    sys.exit(code)  # not ctx.exit: main() runs click with standalone_mode=False


@dataclass
class Session:
    url: str
    token: str | None
    data_dir: Path
    as_json: bool

    @functools.cached_property
    def client(self) -> AdminClient:
        return AdminClient(self.url, self.token or self._token_from_file())

    def _token_from_file(self) -> str:
        path = self.data_dir / "admin-token"
        try:
            token = path.read_text().strip()
        except OSError as exc:
            reason = "not found" if isinstance(exc, FileNotFoundError) else exc.strerror
            token, problem = "", f"cannot read {path} ({reason})"
        else:
            problem = f"{path} is empty"
        if not token:
            _die(
                f"no admin token: {problem}; pass --admin-token, set SHIELDPROXY_ADMIN_TOKEN, "
                "or point --data-dir at the server's data dir",
                2,
            )
        return token

    def emit(self, document: Any, human: Callable[[], str]) -> None:
        text = json.dumps(document, indent=2) if self.as_json else human()
        click.echo(text)


def _connection_options() -> list[click.Parameter]:
    return [
        click.Option(
            ["--admin-url"],
            envvar="SHIELDPROXY_ADMIN_URL",
            type=ADMIN_URL,
            default=DEFAULT_ADMIN_URL,
            show_default=True,
            metavar="URL",
            help="Admin API base URL [env SHIELDPROXY_ADMIN_URL].",
        ),
        click.Option(
            ["--admin-token"],
            envvar="SHIELDPROXY_ADMIN_TOKEN",
            metavar="TOKEN",
            help="Admin token [env SHIELDPROXY_ADMIN_TOKEN; default: <data-dir>/admin-token].",
        ),
        click.Option(
            ["--data-dir"],
            envvar="SHIELDPROXY_SERVER__DATA_DIR",
            default=DEFAULT_DATA_DIR,
            show_default=True,
            type=click.Path(file_okay=False),
            help="The local server's data dir, where its admin-token file is.",
        ),
        click.Option(["--json", "as_json"], is_flag=True, help="Print the API's JSON as is."),
    ]


def admin_command(group: click.Group | None, name: str) -> Callable[..., Any]:
    """`@admin_command(keys, "show")` adds the connection flags, passes a Session, maps errors."""

    def decorate(func: Callable[..., None]) -> click.Command:
        @functools.wraps(func)
        def run(
            admin_url: str, admin_token: str | None, data_dir: str, as_json: bool, **kwargs: Any
        ) -> None:
            session = Session(admin_url, admin_token or None, Path(data_dir), as_json)
            try:
                func(session, **kwargs)
            except AdminError as exc:
                _die(f"{exc.code}: {exc.message}", 1)
            except AdminUnreachable as exc:
                _die(f"cannot reach the admin API at {exc.url}: {exc.reason}", 3)

        command = (group.command if group else click.command)(name)(run)
        command.params += _connection_options()  # after the command's own options in --help
        return command

    return decorate


def collect_pages(
    session: Session, path: str, query: dict[str, Any], every: bool, cursor: str
) -> Any:
    """One page as the API sent it, or with `every` all pages' items merged into one list."""
    page = session.client.get(path, query=query)
    if not every:
        return page
    items, seen = list(page["items"]), set()
    # Stop on a repeated cursor or an empty page too: a log's cursor may always point at its tail.
    while page["items"] and page.get("next_cursor") and page["next_cursor"] not in seen:
        seen.add(page["next_cursor"])
        page = session.client.get(path, query={**query, cursor: page["next_cursor"]})
        items += page["items"]
    return items


def print_page(
    session: Session, result: Any, table: Callable[[list[dict[str, Any]]], str], flag: str
) -> None:
    items = result if isinstance(result, list) else result["items"]
    session.emit(result, lambda: table(items) if items else "(none)")
    next_cursor = None if isinstance(result, list) else result.get("next_cursor")
    if next_cursor and not session.as_json:
        click.echo(f"more: {flag} {next_cursor} (or --all)", err=True)


def confirm_or_stop(what: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{what}: no terminal to confirm on; pass --yes")
    if not click.confirm(f"{what}?", default=False):
        _die("cancelled", 1)


LIST_OPTIONS = [
    click.option("--limit", "page_size", type=click.IntRange(1, 200), help="Items per page."),
    click.option("--cursor", help="Continue from a previous page's next_cursor."),
    click.option("--all", "every", is_flag=True, help="Follow next_cursor through every page."),
]


def with_options(options: Sequence[Callable[..., Any]]) -> Callable[[Callable[..., Any]], Any]:
    def decorate(func: Callable[..., Any]) -> Any:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate
