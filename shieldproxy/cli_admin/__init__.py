"""`shieldproxy keys|tenants|plans|audit`: admin API calls with readable tables or raw JSON.

Exit codes: 0 ok, 1 the API refused (`shieldproxy: <code>: <message>`), 2 bad usage,
3 the admin API cannot be reached. Secrets are printed only when created or rotated.
"""

from __future__ import annotations

import click

from shieldproxy.cli_admin.keys import keys
from shieldproxy.cli_admin.tenants import audit, plans, tenants
from shieldproxy.cli_admin.text import (
    format_limit,
    format_table,
    format_time,
    parse_duration,
    parse_limit,
    parse_timestamp,
)

COMMANDS: tuple[click.Command, ...] = (keys, tenants, plans, audit)

__all__ = [
    "COMMANDS",
    "format_limit",
    "format_table",
    "format_time",
    "parse_duration",
    "parse_limit",
    "parse_timestamp",
]
