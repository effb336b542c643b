"""Property-based run of the admin API against its own /openapi.json (schemathesis)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from tests.client import request
from tests.fixtures.processes import Proxy
from tests.integration.test_admin_api import PLANS

ProxyFactory = Callable[..., Proxy]
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]
EXAMPLES = 15  # per operation and pass: bounded, the whole run stays well under a minute


def _exercise(operation: Any, headers: dict[str, str], path_parameters: dict[str, str]) -> None:
    @settings(
        max_examples=EXAMPLES,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(headers=headers, path_parameters=path_parameters))
    def run(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()


@pytest.mark.slow
def test_admin_api_conforms_to_its_openapi_document(proxy_factory: ProxyFactory) -> None:
    started = time.monotonic()
    proxy = proxy_factory(PLANS, auth=True)
    headers = {"Authorization": f"Bearer {proxy.admin_token}"}
    schema = schemathesis.openapi.from_url(f"{proxy.admin_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 14

    failures: list[str] = []

    def attempt(operation: Any, path_parameters: dict[str, str]) -> None:
        try:
            _exercise(operation, headers, path_parameters)
        except Exception as exc:  # collect every operation's failure, then fail once
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")

    for operation in operations:  # random ids: mostly 404s
        attempt(operation, {})
    # Again with ids that exist, so the 200/409 paths of the {id} operations are generated too.
    for operation in operations:
        if "{id}" not in operation.path:
            continue
        if operation.path.startswith("/v1/keys"):
            created = _post(proxy, headers, "/v1/keys", b'{"name": "fuzz"}')
        else:
            created = _post(proxy, headers, "/v1/tenants", b'{"name": "fuzz", "plan": "free"}')
        attempt(operation, {"id": created["id"]})

    assert not failures, "\n\n".join(failures)
    assert time.monotonic() - started < 60


def _post(proxy: Proxy, headers: dict[str, str], path: str, body: bytes) -> dict[str, Any]:
    reply = request(proxy.admin_port, "POST", path, headers=headers, body=body)
    assert reply.status == 201, reply.body
    doc: dict[str, Any] = reply.json()
    return doc
