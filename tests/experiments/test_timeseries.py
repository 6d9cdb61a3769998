"""Training histories: segment stores on local disk and S3, catalog on SQLite and PostgreSQL."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import numpy as np
import pytest

from unistore.errors import InvalidKeyError, OutOfBoundsError, ShapeMismatchError, StoreExistsError
from unistore.experiments import HistoryNotFoundError, NonFiniteMetricError, TimeSeriesConfig, TimeSeriesStorage
from unistore.experiments import timeseries as ts_module

pytestmark = pytest.mark.leaves_threads


def history(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"epoch": e, "loss": 2.0 / (e + 1), "accuracy": e / (n + start)} for e in range(start, start + n)]


def storage_for(where: str, fmt: str, catalog_url: str, tmp_path: Any, request: pytest.FixtureRequest,
                compression: str | None = "gzip") -> TimeSeriesStorage:
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        root, options = f"s3://{s3['bucket']}/histories", s3["options"]
    else:
        root, options = str(tmp_path / "histories"), {}
    return TimeSeriesStorage(TimeSeriesConfig(storage_dir=root, use_hdf5=fmt == "hdf5", compression=compression,
                                              catalog_url=catalog_url, storage_options=options))


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_store_retrieve_append_and_summary(fmt: str, where: str, catalog_url: str, tmp_path: Any,
                                           request: pytest.FixtureRequest) -> None:
    storage = storage_for(where, fmt, catalog_url, tmp_path, request)
    rows = history(60)
    key = storage.store_training_history("exp_001", rows, metadata={"model": "resnet50", "dataset": "imagenet"})
    assert key == "exp_001"
    got, meta = storage.retrieve_training_history(key)
    assert meta == {"model": "resnet50", "dataset": "imagenet"}
    assert got == rows
    last, _ = storage.retrieve_training_history(key, epochs=slice(-10, None))
    assert last == rows[-10:]
    picked, _ = storage.retrieve_training_history(key, epochs=[3, 0, 59])
    assert [r["epoch"] for r in picked] == [3, 0, 59]
    # a metric first logged at epoch 60 is NaN before it
    assert storage.append_epochs(key, [{"epoch": 60, "loss": 0.01, "lr": 0.1}, {"epoch": 61, "loss": 0.02}]) == 62
    columns, _ = storage.retrieve_training_history(key, as_columns=True)
    assert list(columns) == ["epoch", "loss", "accuracy", "lr"]
    assert np.isnan(columns["lr"][:60]).all() and columns["lr"][60] == 0.1 and np.isnan(columns["lr"][61])
    assert np.isnan(columns["accuracy"][60:]).all()
    np.testing.assert_array_equal(columns["epoch"], np.arange(62))
    stats = storage.get_summary_statistics(key)
    losses = np.array([r["loss"] for r in rows] + [0.01, 0.02])
    assert stats["n_epochs"] == 62
    assert stats["loss"]["min"] == 0.01 and stats["loss"]["argmin_epoch"] == 60
    assert stats["loss"]["max"] == 2.0 and stats["loss"]["argmax_epoch"] == 0
    assert stats["loss"]["last"] == 0.02 and stats["loss"]["count"] == 62
    assert math.isclose(stats["loss"]["mean"], float(losses.mean()))
    assert stats["lr"] == {"min": 0.1, "max": 0.1, "mean": 0.1, "last": 0.1, "argmin_epoch": 60,
                           "argmax_epoch": 60, "count": 1, "first_epoch": 60}
    assert storage.list_histories("exp_001") == [key]


def test_last_epochs_read_only_their_rows(tmp_path: Any) -> None:
    storage = TimeSeriesStorage(TimeSeriesConfig(storage_dir=str(tmp_path / "h"), use_hdf5=False,
                                                 compression="zstd"))
    n = 1_000_000
    key = storage.store_training_history("long", {"loss": np.linspace(5, 0, n), "acc": np.linspace(0, 1, n)})
    storage.reset_io_stats()
    stats_before = storage.get_summary_statistics(key)
    assert storage.io_stats()["bytes"] == 0 and storage.io_stats()["stores_opened"] == 0  # catalog only
    assert stats_before["loss"]["argmin_epoch"] == n - 1
    last, _ = storage.retrieve_training_history(key, epochs=slice(-10, None))
    assert [r["epoch"] for r in last] == list(range(n - 10, n))
    read = storage.io_stats()["bytes"]
    history_bytes = n * 3 * 8
    assert 0 < read < 0.01 * history_bytes, read


def test_many_appends_merge_segments(tmp_path: Any, catalog_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ts_module, "MAX_SEGMENTS", 6)
    monkeypatch.setattr(ts_module, "MERGE_SEGMENTS", 4)
    storage = TimeSeriesStorage(TimeSeriesConfig(storage_dir=str(tmp_path / "h"), use_hdf5=True,
                                                 catalog_url=catalog_url))
    key = storage.store_training_history("run", history(1))
    for e in range(1, 40):
        storage.append_epochs(key, [{"loss": 1.0 / (e + 1), "accuracy": e / 40}])
    rows, _ = storage.retrieve_training_history(key)
    assert [r["epoch"] for r in rows] == list(range(40))
    from sqlalchemy import select

    from unistore.schemas import TrainingHistoryRef

    with storage.catalog.session() as s:
        segments = s.scalar(select(TrainingHistoryRef).where(TrainingHistoryRef.key == key)).segments
        assert len(segments) <= 6
        urls = {seg.store_url for seg in segments}
    on_disk = {os.path.join(tmp_path, "h", "run", f) for f in os.listdir(tmp_path / "h" / "run")}
    assert on_disk == urls  # merged segments were removed


def test_bad_input(tmp_path: Any, catalog_url: str) -> None:
    storage = TimeSeriesStorage(TimeSeriesConfig(storage_dir=str(tmp_path / "h"), catalog_url=catalog_url))
    key = storage.store_training_history("exp", history(5))
    with pytest.raises(StoreExistsError):
        storage.store_training_history("exp", history(3))
    assert storage.store_training_history("exp", history(3), overwrite=True) == "exp"
    assert storage.get_summary_statistics("exp")["n_epochs"] == 3
    with pytest.raises(HistoryNotFoundError, match="no training history 'nope'"):
        storage.retrieve_training_history("nope")
    with pytest.raises(KeyError):
        storage.get_summary_statistics("nope")
    with pytest.raises(NonFiniteMetricError, match="'loss' is inf at row 1"):
        storage.append_epochs(key, [{"loss": 1.0}, {"loss": float("inf")}])
    with pytest.raises(ShapeMismatchError, match="appended epochs must come after"):
        storage.append_epochs(key, [{"epoch": 1, "loss": 1.0}])
    with pytest.raises(ShapeMismatchError, match="epochs must increase"):
        storage.store_training_history("other", [{"epoch": 3, "loss": 1}, {"epoch": 2, "loss": 1}])
    with pytest.raises(InvalidKeyError):
        storage.store_training_history("../escape", history(2))
    with pytest.raises(InvalidKeyError, match="metric name"):
        storage.store_training_history("x", [{"a/b": 1.0}])
    with pytest.raises(OutOfBoundsError):
        storage.retrieve_training_history(key, epochs=[7])
    assert storage.get_summary_statistics(key)["n_epochs"] == 3  # nothing above changed the history
    assert storage.list_histories() == ["exp"]


APPENDER = textwrap.dedent("""
    import sys
    from unistore.experiments import TimeSeriesConfig, TimeSeriesStorage
    storage = TimeSeriesStorage(TimeSeriesConfig(storage_dir=sys.argv[1], use_hdf5=sys.argv[2] == "hdf5",
                                                 catalog_url=sys.argv[3]))
    key = storage.store_training_history("crash", [{"epoch": 0, "loss": 1.0}])
    print("ready", flush=True)
    e = 1
    while True:
        storage.append_epochs(key, [{"epoch": e + i, "loss": 1.0 / (e + i), "acc": 0.5} for i in range(50)])
        e += 50
""")


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_kill_9_mid_append_keeps_committed_epochs(fmt: str, tmp_path: Any, catalog_url: str) -> None:
    root = str(tmp_path / "h")
    proc = subprocess.Popen([sys.executable, "-c", APPENDER, root, fmt, catalog_url], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    storage = TimeSeriesStorage(TimeSeriesConfig(storage_dir=root, use_hdf5=fmt == "hdf5", catalog_url=catalog_url))
    stats = storage.get_summary_statistics("crash")
    n = stats["n_epochs"]
    assert n > 1 and (n - 1) % 50 == 0  # whole appends only
    rows, _ = storage.retrieve_training_history("crash")
    assert [r["epoch"] for r in rows] == list(range(n))
    assert stats["loss"]["last"] == rows[-1]["loss"] and stats["acc"]["count"] == n - 1
    assert storage.append_epochs("crash", [{"loss": 0.5}]) == n + 1  # and it goes on
