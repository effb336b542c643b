"""Fixtures shared by every test: real processes on free loopback ports."""

pytest_plugins = [
    "tests.fixtures.processes",
    "tests.fixtures.redis_servers",
    "tests.limits_helpers",
]
