"""A provider's ask never offers more concurrent sessions than its runtime batches and admits."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner

from marketplace.cli import app
from marketplace.provider.node import Announcement, NodeConfig
from settlement.eip712 import Domain
from worker.runtime import RuntimeLimits


def config(capacity: int, max_sessions: int, tmp_path: Path) -> NodeConfig:
    return NodeConfig(
        model=tmp_path,
        layers="0:2",
        host="127.0.0.1",
        port=1,
        account=Account.create(),
        gateways=(),
        validators=(),
        domain=Domain("Strata", "1", 1),
        tls=None,
        limits=RuntimeLimits(max_sessions=max_sessions),
        retained=tmp_path,
        announce=Announcement("http://127.0.0.1:1", 100, capacity),
    )


def test_a_node_announces_at_most_the_sessions_its_runtime_admits(tmp_path: Path) -> None:
    assert config(8, 8, tmp_path).announce is not None
    with pytest.raises(ValueError, match="max_sessions"):
        config(9, 8, tmp_path)
    with pytest.raises(ValueError):
        config(0, 8, tmp_path)  # capacity 0 is a withdrawal, not an offer


def test_serve_refuses_a_capacity_above_max_sessions_before_anything_else(tmp_path: Path) -> None:
    span = ["--model", str(tmp_path), "--layers", "0:2", "--port", "1"]
    offer = ["--gateway", "http://127.0.0.1:1", "--price", "100", "--capacity", "65", "--max-sessions", "64"]
    result = CliRunner().invoke(app, ["provider", "serve", *span, *offer])
    assert result.exit_code == 2, result.output
    assert "--capacity" in result.output and "max-sessions" in result.output


def test_serve_says_what_capacity_means() -> None:
    result = CliRunner().invoke(app, ["provider", "serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "concurrent sessions batched" in " ".join(result.output.split())
