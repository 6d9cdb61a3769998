"""Credentials never travel in a pickle or a log line; worker processes still authenticate.

(DataLoader workers under fork, spawn and forkserver reading from S3 with
explicit credentials are tested in ``test_dataloader.py``.)
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import unistore as us

from ..conftest import S3_SECRET

pytestmark = pytest.mark.s3

KEY_ID = "AKIDUNISTORETEST42"
SESSION = "FwoGZXIvYXdzEUNISTORESESSION9"


def _options(s3: dict[str, Any]) -> dict[str, Any]:
    return {**s3["options"], "key": KEY_ID, "token": SESSION}


def _store(s3: dict[str, Any]) -> tuple[str, np.ndarray]:
    data = np.arange(64, dtype=np.float32).reshape(16, 4)
    url = f"s3://{s3['bucket']}/emb_npy"
    with us.create_store(url, format="npy", storage_options=s3["options"]) as store:
        store.write_array("emb", data)
    return url, data


def test_pickles_of_stores_and_arrays_hold_no_credentials(s3: dict[str, Any]) -> None:
    url, data = _store(s3)
    store = us.open_store(url, storage_options=_options(s3))
    for blob in (pickle.dumps(store), pickle.dumps(store["emb"]), pickle.dumps(store.location)):
        for secret in (S3_SECRET, KEY_ID, SESSION):
            assert secret.encode() not in blob
    again = pickle.loads(pickle.dumps(store))
    assert again.location.storage_options["secret"] == S3_SECRET  # same process: handed over in memory
    np.testing.assert_array_equal(again["emb"].take([15, 2]), data[[15, 2]])


def test_a_fresh_interpreter_reads_through_the_hand_off_file(s3: dict[str, Any], tmp_path: Any) -> None:
    url, data = _store(s3)
    store = us.open_store(url, storage_options=s3["options"])
    (tmp_path / "store.pkl").write_bytes(pickle.dumps(store["emb"]))
    code = ("import pickle, sys; a = pickle.load(open(sys.argv[1], 'rb')); "
            "print(a.take([3, 0]).tolist())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store.pkl")], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == str(data[[3, 0]].tolist())
    # where the hand-off is not reachable (another machine, another user): a clear error, no secret anywhere
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    code = ("import pickle, sys\nfrom unistore.errors import RemoteError\na = pickle.load(open(sys.argv[1], 'rb'))\n"
            "try:\n    a.take([0])\nexcept RemoteError as e:\n    print('RemoteError', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store.pkl")], capture_output=True, text=True,
                         timeout=120, env=env, check=True)
    assert out.stdout.startswith("RemoteError") and "storage_options" in out.stdout
    assert S3_SECRET not in out.stdout + out.stderr


def test_hand_off_folder_is_private(s3: dict[str, Any]) -> None:
    import stat
    import tempfile

    url, _ = _store(s3)
    pickle.dumps(us.open_store(url, storage_options=s3["options"]))
    folder = os.path.join(tempfile.gettempdir(), f"unistore-secrets-{os.getuid()}")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    files = os.listdir(folder)
    assert files and all(stat.S_IMODE(os.stat(os.path.join(folder, f)).st_mode) == 0o600 for f in files)


def test_debug_logs_of_the_libraries_carry_no_credentials(s3: dict[str, Any]) -> None:
    url, data = _store(s3)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.name} {self.format(record)}")

    root = logging.getLogger()
    handler, level = Keep(logging.DEBUG), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        store = us.open_store(url, storage_options=_options(s3), cache=False)
        np.testing.assert_array_equal(store["emb"].take([1]), data[[1]])
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert any(r.startswith("botocore.endpoint") for r in records)  # the records that used to carry them
    text = "\n".join(records)
    for secret in (S3_SECRET, KEY_ID, SESSION, "testing/"):
        assert secret not in text
