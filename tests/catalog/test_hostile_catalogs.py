"""Damaged catalogs and legacy databases: one typed error naming the file and the fix, nothing half-imported."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import pytest
from sqlalchemy import func, select, text

from unistore import errors
from unistore.catalog import connect
from unistore.cli import main
from unistore.migrations.legacy import LegacyImportError, import_legacy
from unistore.schemas import CatalogOutdatedError, Sample, make_engine

from .legacy_builder import build_legacy_db


def _catalog_file(tmp_path: Any) -> str:
    path = str(tmp_path / "catalog.db")
    connect(path).close()
    return path


@pytest.mark.parametrize("damage", ["random", "truncated", "header"])
def test_a_damaged_sqlite_catalog_is_catalog_corrupt_error(tmp_path: Any, damage: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = _catalog_file(tmp_path)
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        if damage == "random":
            f.write(os.urandom(8192))
        elif damage == "truncated":
            f.write(raw[:100])
        else:
            f.write(b"\x00" * 16 + raw[16:])
    with pytest.raises(errors.CatalogCorruptError, match="restore it from a backup") as info:
        connect(path)
    assert path in str(info.value)
    assert main(["db", "current", "--url", path]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not a readable database" in err


def test_a_catalog_from_a_newer_unistore_says_upgrade_unistore(catalog_url: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    connect(catalog_url).close()
    engine = make_engine(catalog_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    with pytest.raises(CatalogOutdatedError, match="newer than this unistore knows") as info:
        connect(catalog_url)
    assert "pip install -U unistore" in str(info.value) and "behind" not in str(info.value)
    assert main(["db", "upgrade", "--url", catalog_url]) != 0
    err = capsys.readouterr().err
    assert "pip install -U unistore" in err and "Traceback" not in err


def test_downgrade_to_an_unknown_revision_names_the_known_ones(catalog_url: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    connect(catalog_url).close()
    with pytest.raises(CatalogOutdatedError, match="0001"):
        from unistore import migrations

        migrations.downgrade(catalog_url, "nonsense")
    assert main(["db", "downgrade", "nonsense", "--url", catalog_url]) != 0
    assert "Traceback" not in capsys.readouterr().err


def test_a_corrupt_legacy_database_is_a_legacy_import_error(tmp_path: Any) -> None:
    db = str(tmp_path / "dataset.db")
    build_legacy_db(db, 20)
    raw = bytearray(open(db, "rb").read())
    raw[100:4096] = os.urandom(4096 - 100)  # the schema page
    with open(db, "wb") as f:
        f.write(bytes(raw))
    catalog = f"sqlite:///{tmp_path / 'catalog.db'}"
    with pytest.raises(LegacyImportError, match="not a readable SQLite database"):
        import_legacy(db, catalog)


def _set_row(db: str, row: int, **values: Any) -> None:
    conn = sqlite3.connect(db)
    for column, value in values.items():
        conn.execute(f"UPDATE samples SET {column} = ? WHERE sample_id = ?", (value, row))
    conn.commit()
    conn.close()


def test_a_text_sample_id_is_reported_with_skip_bad(tmp_path: Any) -> None:
    """A dataset.db whose sample_id is not the table's integer key (a hand-made variant) can hold text there."""
    db = str(tmp_path / "dataset.db")
    build_legacy_db(db, 20)
    conn = sqlite3.connect(db)
    conn.executescript("ALTER TABLE samples RENAME TO old; CREATE TABLE samples AS SELECT * FROM old; DROP TABLE old;")
    conn.close()
    _set_row(db, 3, sample_id="three")
    catalog = f"sqlite:///{tmp_path / 'catalog.db'}"
    report = import_legacy(db, catalog, skip_bad=True)
    assert report.imported == 19 and [b[0] for b in report.bad] == ["three"]
    assert "three" in str(report)


def test_a_blob_in_a_text_column_is_a_bad_row(catalog_url: str, tmp_path: Any) -> None:
    db = str(tmp_path / "dataset.db")
    build_legacy_db(db, 20)
    _set_row(db, 5, text=b"\x80\x81binary")
    with pytest.raises(LegacyImportError, match="text holds a bytes"):
        import_legacy(db, catalog_url)
    catalog = connect(catalog_url)
    with catalog.session() as session:
        assert session.scalar(select(func.count()).select_from(Sample)) == 0  # all or nothing
    catalog.close()
    report = import_legacy(db, catalog_url, skip_bad=True)
    assert report.imported == 19 and report.bad[0][0] == 5
