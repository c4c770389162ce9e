"""`strata model tiny` and `strata model inspect`."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from marketplace.cli import app
from worker.shard import load_shard

runner = CliRunner()


def test_tiny_writes_a_checkpoint_that_inspects_and_loads(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    result = runner.invoke(
        app, ["model", "tiny", "--arch", "gpt2", "--layers", "3", "--hidden", "64", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    inspected = runner.invoke(app, ["model", "inspect", "--model", str(out), "--json"])
    assert inspected.exit_code == 0, inspected.output
    report = json.loads(inspected.stdout)
    assert report["structure"]["num_layers"] == 3
    assert report["manifest"]["root"] == load_shard(out, "1:3").root


def test_tiny_is_deterministic(tmp_path: Path) -> None:
    roots = []
    for name in ("a", "b"):
        runner.invoke(
            app, ["model", "tiny", "--layers", "2", "--hidden", "64", "--out", str(tmp_path / name)]
        )
        roots.append(
            json.loads(
                runner.invoke(app, ["model", "inspect", "--model", str(tmp_path / name), "--json"]).stdout
            )
        )
    assert roots[0]["manifest"]["root"] == roots[1]["manifest"]["root"]


def test_bad_arguments(tmp_path: Path) -> None:
    assert (
        runner.invoke(app, ["model", "tiny", "--arch", "bert", "--out", str(tmp_path / "x")]).exit_code == 2
    )
    assert (
        runner.invoke(app, ["model", "tiny", "--hidden", "100", "--out", str(tmp_path / "x")]).exit_code == 2
    )
    assert runner.invoke(app, ["model", "tiny", "--layers", "0", "--out", str(tmp_path / "x")]).exit_code == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("")
    taken = runner.invoke(app, ["model", "tiny", "--out", str(tmp_path / "full")])
    assert taken.exit_code == 1
    missing = runner.invoke(app, ["model", "inspect", "--model", str(tmp_path / "none"), "--json"])
    assert missing.exit_code == 1
    assert json.loads(missing.stdout)["error"]["code"] == "checkpoint_error"
