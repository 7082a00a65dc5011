"""Shared fixtures. Each area keeps its fixtures in its own module under tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.system",
    "tests.fixtures.applier",
    "tests.fixtures.world",
    "tests.fixtures.daemon",
    "tests.fixtures.control",
    "tests.reliability.plugin",
]
