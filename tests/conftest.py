"""Shared pytest configuration: fixtures that start real processes live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.processes",
    "tests.fixtures.etcd",
    "tests.fixtures.service",
    "tests.fixtures.pki",
]
