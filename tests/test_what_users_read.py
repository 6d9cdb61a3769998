"""What a user reads when an entry point meets bad input: one exception from ``unistore.errors`` that names what
was wrong and how to fix it, and, from the command line, one line on stderr with no traceback.

Each row: the entry point, the bad input, the error class, and words the message must hold (the thing, the fix).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore import errors
from unistore.cli import main

from .conftest import S3_SECRET


@pytest.fixture(scope="module")
def stores(tmp_path_factory: Any) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for fmt, name in (("zarr", "a.zarr"), ("npy", "a.npy"), ("hdf5", "a.h5"), ("safetensors", "a.safetensors"),
                      ("pt", "a.pt")):
        out[fmt] = str(root / name)
        with us.create_store(out[fmt], format=fmt) as store:
            store.write_array("emb", np.arange(40, dtype=np.float32).reshape(10, 4))
    out["root"] = str(root)
    return out


def _write(path: str, fmt: str, **kw: Any) -> None:
    with us.create_store(path, format=fmt, overwrite=True) as store:
        store.write_array("emb", np.zeros((4, 2), np.float32), **kw)


def _cases(s: dict[str, str]) -> list[tuple[str, Callable[[], Any], type[Exception], tuple[str, ...]]]:
    from unistore import datasets as d

    missing = os.path.join(s["root"], "nope.zarr")
    return [
        ("open_store: no such path", lambda: us.open_store(missing), errors.StoreNotFoundError,
         (missing, "does not exist")),
        ("open_store: not a path", lambda: us.open_store(123), errors.ArgumentTypeError, ("path or URL", "int")),
        ("open_store: unknown format", lambda: us.open_store(s["npy"], format="parquet"), errors.UnknownFormatError,
         ("parquet", "choose one of", "zarr")),
        *[(f"open_store: zarr as {fmt}", lambda fmt=fmt: us.open_store(s["zarr"], format=fmt), errors.FormatError,
           (s["zarr"], "looks like", "format='zarr'")) for fmt in ("hdf5", "npy", "pt", "safetensors")],
        ("open_store: npy as hdf5", lambda: us.open_store(s["npy"], format="hdf5"), errors.FormatError,
         ("looks like", "format='npy'")),
        ("open_store: hdf5 as zarr", lambda: us.open_store(s["hdf5"], format="zarr"), errors.FormatError,
         ("looks like", "format='hdf5'")),
        ("create_store: exists", lambda: us.create_store(s["zarr"], format="zarr"), errors.StoreExistsError,
         (s["zarr"], "overwrite=True")),
        ("write_array: misspelt codec", lambda: _write(os.path.join(s["root"], "w.zarr"), "zarr", compression="zsdt"),
         errors.UnsupportedError, ("'zsdt'", "zstd, gzip, blosc, lz4")),
        ("write_array: hdf5 codec", lambda: _write(os.path.join(s["root"], "w.h5"), "hdf5", compression="zstd"),
         errors.UnsupportedError, ("'zstd'", "gzip, lzf")),
        ("write_array: npy compressed", lambda: _write(os.path.join(s["root"], "w.npy"), "npy", compression="zstd"),
         errors.UnsupportedError, ("uncompressed", "format='zarr'", "format='hdf5'")),
        ("Array.take: strings", lambda: us.open_store(s["npy"])["emb"].take(["a"]), errors.ShapeMismatchError,
         ("integer row indices",)),
        ("Array.take: out of range", lambda: us.open_store(s["npy"])["emb"].take([10]), errors.OutOfBoundsError,
         ("10",)),
        ("store[key]: no such array", lambda: us.open_store(s["npy"])["nope"], errors.ArrayNotFoundError,
         ("'nope'", "emb")),
        ("convert: no such source", lambda: us.convert(missing, os.path.join(s["root"], "c.npy"), format="npy"),
         errors.StoreNotFoundError, (missing,)),
        ("StoreDataset: no such store", lambda: d.StoreDataset(missing), errors.StoreNotFoundError, (missing,)),
        ("create_loader: no such dataset", lambda: d.create_loader(missing), errors.DatasetNotFoundError,
         (missing, "does not exist")),
        ("ClusterLabeledDataset: no such directory", lambda: d.ClusterLabeledDataset(missing),
         errors.DatasetNotFoundError, (missing, "dataset.db")),
        ("create_dataset: unknown name", lambda: d.create_dataset("nope"), errors.DatasetNotFoundError,
         ("'nope'", "available", "register_dataset")),
    ]


CASE_NAMES = [c[0] for c in _cases({k: "" for k in ("zarr", "npy", "hdf5", "safetensors", "pt", "root")})]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_the_api_names_what_was_wrong_and_the_fix(stores: dict[str, str], name: str) -> None:
    _, call, kind, words = next(c for c in _cases(stores) if c[0] == name)
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    for word in words:
        assert word in message, (word, message)
    assert len(message) < 800, message


def test_a_catalog_that_cannot_be_reached_names_its_url_and_the_fix(tmp_path: Any) -> None:
    from unistore.catalog import connect

    with pytest.raises(errors.CatalogUnavailableError, match="127.0.0.1:1.*server is running"):
        connect("postgresql://postgres@127.0.0.1:1/test")
    with pytest.raises(errors.CatalogUnavailableError, match="not a directory"):
        connect(str(tmp_path))  # a directory where the SQLite file belongs


@pytest.mark.s3
def test_s3_without_credentials_says_which_variables_or_options_supply_them(s3_server: str, monkeypatch: Any,
                                                                            capsys: Any) -> None:
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {"client_kwargs": {"endpoint_url": s3_server}, "skip_instance_cache": True}
    for transport in ("fsspec", "obstore"):
        with pytest.raises(errors.CredentialsError) as caught:
            us.open_store("s3://no-creds-bucket/x.zarr", storage_options=options, transport=transport)
        message = str(caught.value)
        for word in ("s3://no-creds-bucket/x.zarr", "AWS_ACCESS_KEY_ID", "storage_options", "'key'", "anon"):
            assert word in message, (word, message)
    assert main(["info", "s3://no-creds-bucket/x.zarr", "-o", f"endpoint_url={s3_server}",
                 "-o", "skip_instance_cache=true"]) == 2
    err = capsys.readouterr().err
    assert "-o key=... -o secret=..." in err and "AWS_ACCESS_KEY_ID" in err and "Traceback" not in err


def test_refused_credentials_are_named_as_such_without_the_secret() -> None:
    # moto checks no signatures: the error S3 answers a wrong key with is judged here as botocore raises it
    options = {"key": "testing", "secret": S3_SECRET, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    from unistore.storage.location import Location, _final_remote_error

    error = _final_remote_error(PermissionError("An error occurred (InvalidAccessKeyId) when calling the "
                                                "HeadObject operation"), Location("s3://b/k", options))
    assert isinstance(error, errors.CredentialsError) and isinstance(error, PermissionError)
    assert "InvalidAccessKeyId" in str(error) and S3_SECRET not in str(error)


@pytest.mark.parametrize("transport", ["fsspec", "obstore"])
def test_a_refused_connection_is_reported_without_spending_the_retry_budget(transport: str) -> None:
    """Nothing listens on port 1: the error names the endpoint after a few quick tries, not at the deadline."""
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"},
               "skip_instance_cache": True}
    with pytest.raises(errors.RemoteError) as caught:
        us.open_store("s3://bucket/x.zarr", storage_options=options, transport=transport, deadline=600)
    message = str(caught.value)
    assert "refused" in message and "http://127.0.0.1:1" in message and "endpoint" in message, message
    assert "deadline" not in message, message  # it did not wait out the 600 s


BLOCKED = [
    ("zarr", "import unistore as us; us.open_store({zarr!r})", "unistore[zarr]"),
    ("h5py", "import unistore as us; us.open_store({hdf5!r})", "unistore[hdf5]"),
    ("safetensors", "import unistore as us; us.open_store({safetensors!r})", "unistore[safetensors]"),
    ("torch", "import unistore as us; us.open_store({pt!r})", "unistore[torch]"),
    ("torch", "from unistore.datasets import StoreDataset; StoreDataset({npy!r})", "unistore[torch]"),
    ("sqlalchemy", "from unistore.catalog import connect", "unistore[catalog]"),
    ("alembic", "from unistore import migrations", "unistore[catalog]"),
    ("chromadb", "from unistore.experiments.search import get_chroma_client; get_chroma_client()",
     "unistore[experiments]"),
    ("dask", "import unistore as us; us.open_store({npy!r})['emb'].to_dask()", "unistore[dask]"),
]


def _blocked(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter where ``module`` cannot be imported (as after a bare pip install)."""
    prelude = (f"import sys; sys.modules[{module!r}] = None\n"
               "from unistore.errors import MissingDependencyError\n"
               "try:\n    exec(sys.argv[1])\n"
               "except MissingDependencyError as e:\n    print('MissingDependencyError:', e); sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", prelude, code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module,code,extra", BLOCKED, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BLOCKED)])
def test_a_missing_optional_library_names_the_extra_that_brings_it(stores: dict[str, str], module: str, code: str,
                                                                    extra: str) -> None:
    done = _blocked(module, code.format(**stores))
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert module in done.stdout and f"pip install '{extra}'" in done.stdout, done.stdout


# ------------------------------------------------------------------ the command line
def _cli(*args: str, module: str | None = None) -> subprocess.CompletedProcess[str]:
    block = f"import sys; sys.modules[{module!r}] = None\n" if module else ""
    code = block + "import sys\nfrom unistore.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def _cli_cases(s: dict[str, str]) -> list[tuple[str, tuple[str, ...], str | None, tuple[str, ...]]]:
    missing = os.path.join(s["root"], "nope.zarr")
    return [
        ("info: no such path", ("info", missing), None, (missing, "does not exist")),
        ("info: wrong format", ("info", s["zarr"], "--format", "hdf5"), None, ("looks like", "format='zarr'")),
        ("convert: destination exists", ("convert", s["npy"], s["zarr"], "--to", "zarr", "-q"), None,
         ("already exists", "--overwrite")),
        ("convert: misspelt codec", ("convert", s["npy"], os.path.join(s["root"], "cli.zarr"), "--to", "zarr",
                                     "--compression", "zsdt", "-q"), None, ("zsdt", "zstd")),
        ("db downgrade: unknown revision", ("db", "downgrade", "nonsense", "--url",
                                            os.path.join(s["root"], "c.db")), None, ("'nonsense'", "head, base")),
        ("db current: unreachable server", ("db", "current", "--url", "postgresql://postgres@127.0.0.1:1/test"),
         None, ("127.0.0.1:1", "server is running")),
        ("info: zarr missing", ("info", s["zarr"]), "zarr", ("zarr", "pip install 'unistore[zarr]'")),
        ("db: sqlalchemy missing", ("db", "current", "--url", os.path.join(s["root"], "d.db")), "sqlalchemy",
         ("sqlalchemy", "pip install 'unistore[catalog]'")),
    ]


CLI_NAMES = [c[0] for c in _cli_cases({k: "" for k in ("zarr", "npy", "hdf5", "safetensors", "pt", "root")})]


@pytest.mark.parametrize("name", CLI_NAMES)
def test_the_command_line_prints_one_line_naming_the_fix(stores: dict[str, str], name: str) -> None:
    _, args, blocked, words = next(c for c in _cli_cases(stores) if c[0] == name)
    done = _cli(*args, module=blocked)
    assert done.returncode == 2, (done.stdout, done.stderr)
    err = done.stderr.strip()
    assert "Traceback" not in err and err.startswith("error: ") and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)


def test_output_cut_short_by_a_closed_pipe_ends_quietly(stores: dict[str, str], tmp_path: Any) -> None:
    many = str(tmp_path / "many.npy")
    with us.create_store(many, format="npy") as store:
        for i in range(2000):
            store.write_array(f"array_{i:04d}", np.zeros((1, 1), np.float32))
    code = "import sys\nfrom unistore.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    reader = subprocess.Popen([sys.executable, "-c", code, "info", many], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert reader.stdout is not None and reader.stderr is not None
    first = reader.stdout.readline()
    reader.stdout.close()  # what `| head -1` does
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=120) == 0, err
    assert first.startswith(b"store:") and "Traceback" not in err and "BrokenPipe" not in err, err


def test_version_and_help_texts() -> None:
    from importlib.metadata import version

    done = _cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"unistore {version('unistore')}"
    helps = _cli("convert", "--help").stdout
    for word in ("the store to read", "the store to write", "--overwrite", "destination only"):
        assert word in helps, helps
    demo = _cli("demo", "--help").stdout
    assert "rows of the embedding dataset" in demo and "embedding width" in demo, demo


def test_the_extras_table_in_the_docs_matches_the_package() -> None:
    """Each optional library names an extra that pyproject.toml defines, and the docs' table lists it there."""
    import tomllib
    from pathlib import Path

    from unistore._optional import EXTRAS

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    rows = {line.split("|")[1].strip(" `"): line for line in (root / "docs" / "install.md").read_text().splitlines()
            if line.startswith("| `")}
    names = {"upath": "universal_pathlib", "sqlalchemy": "sqlalchemy", "distributed": "distributed"}
    for module, (extra, _) in EXTRAS.items():
        assert extra in extras, (module, extra)
        assert extra in rows and names.get(module, module) in rows[extra], (module, extra, rows.get(extra))
        listed = " ".join(extras[extra]).lower()
        assert names.get(module, module).replace("_", "").lower() in listed.replace("_", "") \
            or "unistore[" in listed, (module, extra, listed)
