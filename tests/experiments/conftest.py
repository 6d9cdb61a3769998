"""Catalogs on SQLite and PostgreSQL for the experiment tests."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    from ..catalog.conftest import _pg_database

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
    else:
        yield from _pg_database()
