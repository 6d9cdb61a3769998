"""The experiments part of the main job: a lab's results offloaded, searched and read back."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.leaves_threads


def test_experiments_demo(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from unistore.demo_experiments import run_experiments_demo

    result = run_experiments_demo(str(tmp_path), epochs=5000)
    assert result["offloaded"] == 8 and result["best"][0] == "width-3"
    out = capsys.readouterr().out
    assert "(0 left in the lab's memory)" in out and "from the time series" in out
