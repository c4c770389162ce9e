"""Where commands get their keys: a key file readable by its owner only, an encrypted keystore, or the
environment; never a `--key` argument."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from typer.testing import CliRunner

from marketplace.cli import app
from marketplace.cli.keys import KEYSTORE_PASSWORD_ENV
from tests.marketplace.cli.keyfile import key_file

runner = CliRunner()
SETTINGS = ("CLIENT_KEY", "PROVIDER_KEY", "GATEWAY_KEY", "DEPLOYER_KEY", "RPC_URL", "DEPLOYMENT_FILE",
            KEYSTORE_PASSWORD_ENV)  # fmt: skip
# Every command that signs, as a user would type it without its key.
SIGNING = [
    ["client", "balance"],
    ["client", "deposit", "1"],
    ["provider", "status"],
    ["provider", "stake", "1"],
    ["chain", "deploy"],
    ["gateway", "serve"],
    ["provider", "serve", "--model", "m", "--layers", "0:1", "--port", "9"],
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env, and no deployment: a command that got its key stops there


def refusal(args: list[str]) -> dict[str, Any]:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 1, result.output
    error: dict[str, Any] = json.loads(result.stdout)["error"]
    return error


def keystore(account: LocalAccount, password: str, directory: Path) -> str:
    path = directory / "keystore.json"
    path.write_text(json.dumps(Account.encrypt(account.key, password, iterations=2)))
    return str(path)


@pytest.mark.parametrize("command", SIGNING, ids=lambda c: " ".join(c[:2]))
def test_no_command_takes_a_key_on_its_command_line(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--key", "0x" + "11" * 32])
    assert result.exit_code == 2
    assert "No such option: --key" in " ".join(result.output.replace("│", " ").split())


def test_a_key_file_readable_by_its_owner_only_is_taken() -> None:
    account = Account.create()
    result = refusal(["client", "balance", "--key-file", key_file(account, mode=0o600)])
    assert result["code"] == "configuration_error"  # past the key: no deployment here
    assert (
        refusal(["client", "balance", "--key-file", key_file(account, mode=0o400)])["code"]
        == "configuration_error"
    )


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
@pytest.mark.parametrize("command", [["client", "balance"], ["provider", "stake", "1"], ["chain", "deploy"]])
def test_a_key_file_others_may_read_is_refused_with_a_code(mode: int, command: list[str]) -> None:
    path = key_file(Account.create(), mode=mode)
    error = refusal([*command, "--key-file", path])
    assert error["code"] == "key_file_permissions"
    assert f"{mode:04o}" in error["message"] and "0600" in error["message"]


def test_a_missing_key_file_is_refused_with_a_code(tmp_path: Path) -> None:
    assert (
        refusal(["client", "balance", "--key-file", str(tmp_path / "absent")])["code"]
        == "key_file_unreadable"
    )


def test_a_keystore_is_opened_with_the_password_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    account = Account.create()
    path = keystore(account, "correct horse", tmp_path)
    # CliRunner's stdin is not a terminal: without the password there is no one to ask.
    assert refusal(["client", "balance", "--keystore", path])["code"] == "keystore_password_missing"
    monkeypatch.setenv(KEYSTORE_PASSWORD_ENV, "wrong")
    assert refusal(["client", "balance", "--keystore", path])["code"] == "keystore_invalid"
    monkeypatch.setenv(KEYSTORE_PASSWORD_ENV, "correct horse")
    assert refusal(["client", "balance", "--keystore", path])["code"] == "configuration_error"


def test_the_keystore_opens_to_its_own_account(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from marketplace.cli.keys import load_account

    account = Account.create()
    monkeypatch.setenv(KEYSTORE_PASSWORD_ENV, "pw")
    opened = load_account(key_file=None, keystore=Path(keystore(account, "pw", tmp_path)), env_key=None,
                          env_name="CLIENT_KEY")  # fmt: skip
    assert opened is not None and opened.address == account.address


def test_a_key_file_comes_before_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import SecretStr

    from marketplace.cli.keys import load_account

    from_file, from_env = Account.create(), Account.create()
    chosen = load_account(key_file=Path(key_file(from_file)), keystore=None,
                          env_key=SecretStr(from_env.key.hex()), env_name="CLIENT_KEY")  # fmt: skip
    assert chosen is not None and chosen.address == from_file.address
    from_environment = load_account(key_file=None, keystore=None, env_key=SecretStr(from_env.key.hex()),
                                    env_name="CLIENT_KEY")  # fmt: skip
    assert from_environment is not None and from_environment.address == from_env.address


def test_a_key_file_and_a_keystore_together_are_a_usage_error(tmp_path: Path) -> None:
    path = key_file(Account.create())
    result = runner.invoke(app, ["client", "balance", "--key-file", path, "--keystore", path])
    assert result.exit_code == 2 and "not both" in result.output


def test_the_environment_still_gives_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIENT_KEY", "0x" + bytes(Account.create().key).hex())
    assert refusal(["client", "balance"])["code"] == "configuration_error"
    assert os.environ["CLIENT_KEY"]  # and nothing on the command line
