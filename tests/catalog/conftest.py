"""Catalog tests use the shared ``catalog_url`` fixture (SQLite and PostgreSQL) from ``tests/conftest.py``."""
