"""Test tiers are selected with markers; each test gets its tier from its folder."""

from pathlib import Path

import pytest

TIERS = {"unit", "integration"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
