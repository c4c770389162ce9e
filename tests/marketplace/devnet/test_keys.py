"""Keys under `strata up`: files that hold them are 0600 from their creation, and the settlement worker and the
validator each get their own key and not the other's."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from eth_account import Account

from marketplace.devnet.chain import Devnet, key_hex
from marketplace.devnet.private import KEY_SETTINGS, write_private
from marketplace.devnet.up import Options, validator_command, worker_command, worker_environments
from settlement.deploy import DeployParams
from settlement.tasks import SETTLEMENT_QUEUE, VALIDATION_QUEUE

ROLES = ("admin", "operator", "validator", "gateway", "client-1")


def fake_devnet(tmp_path: Path) -> Devnet:
    accounts = {role: Account.create() for role in ROLES}
    fake: Any = SimpleNamespace(
        anvil=SimpleNamespace(url="http://127.0.0.1:8545"),
        contracts=SimpleNamespace(chain=SimpleNamespace(chain_id=31337)),
        accounts=accounts,
        deployment_file=tmp_path / "deployment.json",
    )
    # Devnet's own methods, on a devnet that needs no chain.
    return cast(Devnet, Devnet(fake.anvil, fake.contracts, accounts, fake.deployment_file))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_devnet_file_and_key_files_are_0600(tmp_path: Path) -> None:
    devnet = fake_devnet(tmp_path)
    written = devnet.write(gateway_url="http://127.0.0.1:8000")
    assert mode(written) == 0o600
    assert json.loads(written.read_text())["accounts"]["client-1"]["key"] == key_hex(
        devnet.accounts["client-1"]
    )
    for role, account in devnet.accounts.items():
        path = devnet.key_file(role)
        assert mode(path) == 0o600 and path.read_text().strip() == key_hex(account)


def test_a_private_file_replaces_a_looser_one_and_is_never_looser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "devnet.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    opened: list[int] = []
    real_open = os.open

    def watched(file: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
        opened.append(mode)
        return real_open(file, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", watched)
    write_private(path, "new")
    assert opened == [0o600]  # created with the mode, not chmod-ed after
    assert mode(path) == 0o600 and path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["devnet.json"]


def test_the_worker_and_the_validator_each_hold_only_their_own_key(tmp_path: Path) -> None:
    devnet = fake_devnet(tmp_path)
    options = Options(port=8000, chain_port=8545, epoch_s=5, state_dir=tmp_path, params=DeployParams())
    # The shell that ran `strata up` may hold keys of its own: no child inherits them.
    shell = {"PATH": "/usr/bin", **{name: "0x" + "11" * 32 for name in KEY_SETTINGS}}
    worker_env, validator_env = worker_environments(devnet, shell, "[]", options)

    operator_key, validator_key = key_hex(devnet.accounts["operator"]), key_hex(devnet.accounts["validator"])
    assert {n for n in KEY_SETTINGS if n in worker_env} == {"OPERATOR_KEY"}
    assert worker_env["OPERATOR_KEY"] == operator_key
    assert {n for n in KEY_SETTINGS if n in validator_env} == {"VALIDATOR_KEY"}
    assert validator_env["VALIDATOR_KEY"] == validator_key
    # No other variable carries either key.
    assert validator_key not in worker_env.values() and operator_key not in validator_env.values()
    # The worker samples hops for the validator it cannot sign as.
    assert worker_env["VALIDATOR_ADDRESS"] == devnet.accounts["validator"].address
    # Each consumes its own queue; only the worker schedules epochs.
    worker, validator = worker_command(tmp_path), validator_command()
    assert worker[worker.index("-Q") + 1] == SETTLEMENT_QUEUE and "-B" in worker
    assert validator[validator.index("-Q") + 1] == VALIDATION_QUEUE and "-B" not in validator
