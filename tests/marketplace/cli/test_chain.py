"""`strata chain deploy` against a real anvil, and every way its arguments can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marketplace.cli import app
from marketplace.devnet.anvil import Anvil
from marketplace.devnet.process import free_port
from settlement.artifacts import Artifact
from settlement.chain import Chain
from settlement.deploy import Contracts, Deployment
from tests.marketplace.cli.keyfile import key_file

runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("RPC_URL", "DEPLOYER_KEY", "OPERATOR_KEY", "DEPLOYMENT_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env, and .strata/ lands in the test's own directory


def test_deploy_writes_a_loadable_deployment(
    anvil: Anvil, chain: Chain, artifacts: dict[str, Artifact], tmp_path: Path
) -> None:
    out = tmp_path / "deployment.json"
    deployer, operator = anvil.accounts[0], anvil.accounts[1]
    result = runner.invoke(
        app,
        [
            "chain", "deploy", "--rpc", anvil.url, "--key-file", key_file(deployer),
            "--operator", operator.address, "--out", str(out), "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["chain_id"] == 31337
    assert printed["roles"]["operator"] == operator.address
    contracts = Contracts.load(chain, Deployment.load(out), artifacts)
    assert contracts.token.decimals() == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rpc", "ftp://x"], "not an http(s) JSON-RPC URL"),
        (["--key-file", "0x1234"], "a private key is 32 bytes of hex"),
        (["--key-file", "zz" * 32], "not a usable private key"),
        (["--key", "0x" + "11" * 32], "No such option: --key"),
        (["--operator", "0xnope"], "not an Ethereum address"),
        (["--challenger-bps", "10001"], "less than or equal to 10000"),
        (["--min-stake", "-1"], "greater than or equal to 0"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    if "--key-file" in args:  # what the key file holds
        args = ["--key-file", key_file(args[1]), *args[2:]]
    key = ["--key-file", key_file("0x" + "11" * 32)] if "--key-file" not in args else []
    result = runner.invoke(app, ["chain", "deploy", *key, *args])
    assert result.exit_code == 2
    flowing = " ".join(result.output.replace("│", " ").split())  # undo Rich's panel wrapping
    assert message in flowing


def test_missing_key_fails_with_a_code() -> None:
    result = runner.invoke(app, ["chain", "deploy", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "missing_key"


def test_unreachable_chain_fails_with_a_code() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(
        app, ["chain", "deploy", "--rpc", url, "--key-file", key_file("0x" + "11" * 32), "--json"]
    )
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "chain_unavailable"


def test_unfunded_deployer_fails_with_a_code(anvil: Anvil) -> None:
    unfunded = key_file("0x" + "22" * 32)
    result = runner.invoke(app, ["chain", "deploy", "--rpc", anvil.url, "--key-file", unfunded, "--json"])
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "transaction_rejected"
    assert "funds" in error["message"].lower()
