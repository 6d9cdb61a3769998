"""Catalog migrations: Alembic inside the package, configured in code.

>>> from unistore import migrations
>>> migrations.upgrade("sqlite:///catalog.db")          # to head
>>> migrations.current_revision(engine)
>>> migrations.check(engine)                            # [] when models and migrations agree
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from unistore._optional import require

require("sqlalchemy", "catalog migrations")
require("alembic", "catalog migrations")

from sqlalchemy import Engine

__all__ = ["alembic_config", "upgrade", "downgrade", "current_revision", "head_revision", "history", "check",
           "revision", "import_legacy"]

HERE = Path(__file__).resolve().parent


def alembic_config(connection: Any = None) -> Any:
    """An ``alembic.config.Config`` pointing into this package (no alembic.ini)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


def _engine(target: Engine | str | os.PathLike[str] | None) -> tuple[Engine, bool]:
    if isinstance(target, Engine):
        return target, False
    from unistore.schemas.engine import make_engine

    return make_engine(target), True


def _run(target: Engine | str | os.PathLike[str] | None, action: str, revision: str) -> None:
    from alembic import command
    from alembic.util.exc import CommandError

    from unistore.schemas.engine import CatalogOutdatedError, safe_url, unavailable_as_typed

    engine, owned = _engine(target)
    try:
        with unavailable_as_typed(engine), engine.begin() as conn:
            current = _revision_of(conn)
            if current is not None and not known_revision(current):
                raise CatalogOutdatedError(
                    f"the catalog at {safe_url(engine.url)} is at schema revision {current}, newer than this unistore "
                    f"knows (its newest is {head_revision()}); upgrade unistore (pip install -U unistore) to "
                    f"{action} it")
            try:
                getattr(command, action)(alembic_config(conn), revision)
            except CommandError as e:
                known = ", ".join(r for r, _, _ in history()) + ", head, base"
                raise CatalogOutdatedError(f"cannot {action} the catalog at {safe_url(engine.url)} to {revision!r}: "
                                           f"{e}; revisions this unistore knows: {known}") from e
    finally:
        if owned:
            engine.dispose()


def _revision_of(conn: Any) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def known_revision(revision: str) -> bool:
    """Whether ``revision`` is one of the migrations shipped with this unistore."""
    try:
        return _script().get_revision(revision) is not None
    except Exception:  # noqa: BLE001 - alembic raises several kinds (ResolutionError, CommandError) for "unknown"
        return False


def upgrade(target: Engine | str | os.PathLike[str] | None = None, revision: str = "head") -> None:
    """Migrate the catalog at ``target`` (engine, URL or SQLite path) up to ``revision``."""
    _run(target, "upgrade", revision)


def downgrade(target: Engine | str | os.PathLike[str] | None, revision: str) -> None:
    """Migrate the catalog down to ``revision`` (``base`` removes every table)."""
    _run(target, "downgrade", revision)


def current_revision(target: Engine | str | os.PathLike[str] | None = None) -> str | None:
    """The catalog's revision, or None for a database never migrated."""
    from alembic.runtime.migration import MigrationContext

    engine, owned = _engine(target)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        if owned:
            engine.dispose()


@functools.cache
def _script() -> Any:
    # the revision files ship with the package: parse them once per process
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision shipped with this unistore (exactly one head)."""
    heads = _script().get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"unistore migrations have {len(heads)} heads: {heads}")
    return str(heads[0])


def history() -> list[tuple[str, str | None, str]]:
    """``(revision, down_revision, message)`` from newest to oldest."""
    return [(s.revision, s.down_revision, s.doc) for s in _script().walk_revisions()]  # type: ignore[misc]


def check(target: Engine | str | os.PathLike[str] | None = None) -> list[Any]:
    """Differences between the models and the migrated database ([] when none)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from unistore.schemas.models import Base

    engine, owned = _engine(target)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        if owned:
            engine.dispose()


def revision(message: str, target: Engine | str | os.PathLike[str] | None = None, autogenerate: bool = True,
             rev_id: str | None = None) -> Path:
    """Write a new migration into this package's ``versions/`` directory and return its path.

    With ``autogenerate`` the catalog at ``target`` (migrated to head first) is compared with the models and
    the differences are written as operations; without it the file holds empty ``upgrade``/``downgrade``
    functions to fill in.  The revision id is the next number after the head (``0005``), unless given.

    Raises:
        CatalogOutdatedError: the catalog is at a revision this unistore does not know.
        CatalogUnavailableError: the catalog cannot be reached.
    """
    from alembic import command

    from unistore.schemas.engine import unavailable_as_typed

    head = head_revision()
    rev_id = rev_id or (f"{int(head) + 1:04d}" if head.isdigit() else None)
    if not autogenerate:
        script = command.revision(alembic_config(), message=message, rev_id=rev_id)
    else:
        upgrade(target)
        engine, owned = _engine(target)
        try:
            with unavailable_as_typed(engine), engine.begin() as conn:
                script = command.revision(alembic_config(conn), message=message, autogenerate=True, rev_id=rev_id)
        finally:
            if owned:
                engine.dispose()
    _script.cache_clear()
    return Path(script.path)  # type: ignore[union-attr]


def __getattr__(name: str) -> Any:
    if name == "import_legacy":
        from unistore.migrations.legacy import import_legacy

        return import_legacy
    raise AttributeError(name)
