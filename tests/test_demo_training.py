"""The training half of the main job, small: every backend (and a bucket on the S3 server) trains, loss falls."""

from __future__ import annotations

from typing import Any

import pytest

from unistore.demo_training import run_training_demo


@pytest.mark.s3
def test_training_demo_runs_on_every_backend(tmp_path: Any, s3_server: str, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    results = run_training_demo(str(tmp_path / "demo"), rows=3000, pairs=3000, dim=32, steps=60, batch_size=64,
                                s3_endpoint=s3_server)
    backends = {(r["dataset"], r["backend"]) for r in results}
    for dataset in ("ClusterLabeled", "JASPER"):
        for backend in ("npy", "pt", "safetensors", "hdf5 gzip", "zarr zstd", "zarr zstd on S3"):
            assert (dataset, backend) in backends
    assert ("ClusterLabeled", "seed layout (sqlite + memmap)") in backends
    for r in results:
        assert r["last"] < r["first"], r
        assert r["samples_s"] > 0
    out = capsys.readouterr().out
    assert "the loss fell on every backend" in out and "S3: training also from s3://" in out


def test_training_demo_notes_a_missing_s3_server(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    results = run_training_demo(str(tmp_path / "demo"), rows=500, pairs=500, dim=8, steps=5, batch_size=64,
                                s3_endpoint="http://127.0.0.1:9")
    assert "S3: skipped" in capsys.readouterr().out
    assert not any("S3" in r["backend"] for r in results)

