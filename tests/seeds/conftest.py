"""The seed documents' calls take no catalog argument: each conformance test runs once with the default
catalog on SQLite and once on PostgreSQL (``UNISTORE_CATALOG_URL``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def doc_catalog(catalog_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("UNISTORE_CATALOG_URL", catalog_url)
    return catalog_url
