"""Connecting to the catalog: open its database and bring its schema to this version.

Above both :mod:`unistore.schemas` (models, engines) and
:mod:`unistore.migrations` (Alembic revisions), which each need only the
first: the schema's modules never import the migrations, and the migrations
import the schema's engine and models only.

>>> from unistore.catalog import connect
>>> catalog = connect("catalog.db")            # or "postgresql://user@host/db"
"""

from __future__ import annotations

import os
from typing import Any

from unistore._optional import require

require("sqlalchemy")

from sqlalchemy.engine import Engine

from unistore.schemas.engine import Catalog, CatalogOutdatedError, make_engine, safe_url, unavailable_as_typed

__all__ = ["connect"]


def connect(url: str | os.PathLike[str] | None = None, upgrade: bool | None = None, *, write_lock: bool = True,
            **engine_kwargs: Any) -> Catalog:
    """Open the catalog at ``url`` and check that its schema is current.

    An empty database is migrated to the current schema (a new catalog);
    ``upgrade=True`` also migrates an outdated one, ``upgrade=False`` never
    migrates.

    Raises:
        CatalogOutdatedError: the schema is behind (or ahead of) this version,
            naming the ``unistore db upgrade`` command that fixes it.
    """
    from unistore.migrations import current_revision, head_revision, known_revision
    from unistore.migrations import upgrade as run_upgrade

    engine = make_engine(url, write_lock=write_lock, **engine_kwargs)
    with unavailable_as_typed(engine):
        current = current_revision(engine)
    head = head_revision()
    if current is not None and current != head and not known_revision(current):
        shown = safe_url(engine.url)
        engine.dispose()
        raise CatalogOutdatedError(
            f"the catalog at {shown} is at schema revision {current}, newer than this unistore knows (its newest "
            f"is {head}): it was migrated by a newer unistore - upgrade unistore (pip install -U unistore); "
            "'unistore db upgrade' cannot help")
    if current != head:
        if upgrade or (upgrade is None and current is None and _is_empty(engine)):
            run_upgrade(engine, "head")
        else:
            shown = safe_url(engine.url)
            engine.dispose()
            raise CatalogOutdatedError(
                f"the catalog at {shown} is at schema revision {current or 'none'}, this unistore needs {head}; "
                f"run: unistore db upgrade --url '{shown}'"
            )
    return Catalog(engine)


def _is_empty(engine: Engine) -> bool:
    from sqlalchemy import inspect

    with engine.connect() as conn:
        return not [t for t in inspect(conn).get_table_names() if t != "alembic_version"]
