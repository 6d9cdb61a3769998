"""A convert killed mid-run leaves a spill folder and a staging entry; the next run removes what dead runs left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pytest

import unistore as us
from unistore.storage.leftovers import sweep

KILLED = """
import sys, time, unistore as us
us.convert(sys.argv[1], sys.argv[2], format="zarr", on_array=lambda key: (print("staged", flush=True),
                                                                         time.sleep(600)))
"""


def _leftovers(folder: Any, tmp: Any) -> list[str]:
    return sorted([p for p in os.listdir(folder) if ".unistore-tmp-" in p] +
                  [p for p in os.listdir(tmp) if p.startswith("unistore-convert-")])


@pytest.mark.timeout(120)
def test_next_convert_removes_what_a_killed_one_left(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    src = tmp_path / "src"
    with us.create_store(src, format="npy") as store:
        store.write_array("emb", np.arange(40, dtype=np.float32).reshape(10, 4))
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(src), str(out / "a.zarr")], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "staged"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    left = _leftovers(out, tmp)
    assert len(left) == 2, left  # the staging entry beside the destination and the spill folder
    assert not (out / "a.zarr").exists()

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    us.convert(src, out / "b.zarr", format="zarr")
    assert _leftovers(out, tmp) == []
    np.testing.assert_array_equal(us.open_store(out / "b.zarr")["emb"][...], np.arange(40).reshape(10, 4))


def test_sweep_keeps_entries_of_live_owners_and_foreign_names(tmp_path: Any) -> None:
    live = tmp_path / f".x.unistore-tmp-{os.getpid()}-abc"
    live.mkdir()
    dead_pid = _dead_pid()
    dead = tmp_path / f"unistore-convert-{dead_pid}-q1w2"
    dead.mkdir()
    (dead / "0.bin").write_bytes(b"x")
    foreign = tmp_path / "unistore-notes"
    foreign.mkdir()
    assert sweep(str(tmp_path)) == [str(dead)]
    assert live.exists() and foreign.exists() and not dead.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    time.sleep(0.05)
    return proc.pid
