"""The built wheel carries what an installed unistore needs to write migrations (``unistore db revision``)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: Any) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (found,) = out.glob("unistore-*.whl")
    return found


@pytest.mark.slow
def test_the_wheel_writes_a_migration_from_its_own_template(wheel: Path, tmp_path: Any) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        z.extractall(tmp_path / "site")
    assert "unistore/migrations/script.py.mako" in names and "unistore/py.typed" in names
    assert "License-Expression: Apache-2.0" in metadata, metadata[:800]
    catalog = tmp_path / "catalog.db"
    code = (f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r})\n"
            "import unistore; assert unistore.__file__.startswith(sys.path[0]), unistore.__file__\n"
            "from unistore.cli import main; sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", code, "db", "revision", "-m", "Add a notes column",
                           "--url", str(catalog)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    written = tmp_path / "site" / "unistore" / "migrations" / "versions" / "0005_add_a_notes_column.py"
    assert str(written) in done.stdout and written.exists(), (done.stdout, sorted(written.parent.iterdir()))
    text = written.read_text()
    assert "revision: str = '0005'" in text and "down_revision: str | None = '0004'" in text, text
    assert text.startswith('"""Add a notes column')
    # models and migrations agree: autogenerate found nothing, and the bodies are empty
    bodies = [part.split("\n\n\n")[0] for part in text.split("def ")[1:]]
    assert [b.splitlines()[0] for b in bodies] == ["upgrade() -> None:", "downgrade() -> None:"], bodies
    assert all([line.strip() for line in b.splitlines()[1:] if not line.strip().startswith("#")] == ["pass"]
               for b in bodies), bodies
