"""Test tiers are selected with markers; each test gets its tier from its top folder
under tests/ (tests/unit/admission/... is unit)."""

from pathlib import Path

import pytest

# The session's real server (started once, on first use) serves the integration and
# loadtest tiers alike.
pytest_plugins = ["tests.live_server"]

TIERS = {"unit", "integration", "loadtest", "deploy", "ray"}
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        relative = Path(str(item.fspath)).resolve().relative_to(TESTS)
        tier = relative.parts[0] if len(relative.parts) > 1 else None
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
