"""``unistore experiments search|show|export|reindex`` on a real embedded index and catalog."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest

from unistore.cli import main
from unistore.experiments import ChromaConfig, ExperimentSearcher, reset_chroma_client

from .test_search import EXPERIMENTS

pytestmark = pytest.mark.leaves_threads


def test_experiments_cli(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    chroma, catalog = str(tmp_path / "chroma"), str(tmp_path / "catalog.db")
    searcher = ExperimentSearcher(ChromaConfig(persist_directory=chroma), catalog_url=catalog)
    searcher.index_experiments(EXPERIMENTS)
    searcher.close()
    common = ["--chroma-dir", chroma, "--url", catalog]

    assert main(["experiments", "search", *common, "--architecture", "784,500,250,10", "-n", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].startswith("mlp-a") and lines[-1] == "2 experiments"
    assert main(["experiments", "search", *common, "--min-accuracy", "0.9", "--dataset", "mnist"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == ["mlp-deeper", "mlp-a", "mlp-shallow"]
    assert main(["experiments", "search", *common, "--hypothesis", "width"]) == 0
    assert "cifar-wide" in capsys.readouterr().out
    assert main(["experiments", "show", *common, "cifar-small"]) == 0
    # the same record as one line of `export`: the id with the data
    assert json.loads(capsys.readouterr().out) == {"experiment_id": "cifar-small",
                                                   "experiment_data": EXPERIMENTS["cifar-small"]}
    assert main(["experiments", "export", *common, "-O", str(tmp_path / "all.jsonl")]) == 0
    exported = [json.loads(line) for line in open(tmp_path / "all.jsonl")]
    assert {e["experiment_id"]: e["experiment_data"] for e in exported} == EXPERIMENTS

    reset_chroma_client()
    shutil.rmtree(chroma)
    assert main(["experiments", "reindex", *common, "-q"]) == 0
    assert "reindexed 5 experiments" in capsys.readouterr().out
    assert main(["experiments", "search", *common, "--architecture", "784,500,250,10", "-n", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("mlp-a")

    assert main(["experiments", "show", *common, "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err
    assert main(["experiments", "search", *common, "--similar", "{not json"]) == 2
    assert main(["experiments", "search", *common, "--architecture", "784,10", "--filter",
                 '{"accuracy": {"$near": 1}}']) == 2
    assert "$near" in capsys.readouterr().err
    assert main(["experiments", "search", *common, "--filter", '{"accuracy": {"$gte": "high"}}']) == 2
    assert "$gte compares numbers" in capsys.readouterr().err
