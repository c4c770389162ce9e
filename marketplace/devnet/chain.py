"""A local chain for the devnet: anvil with the contracts deployed, one development account per role, and the
demo accounts funded; and the devnet file that tells `strata demo` where everything is."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from rich.console import Console

from marketplace.devnet.anvil import Anvil
from marketplace.devnet.contracts import build_contracts
from marketplace.devnet.market import FUNDED_ROLES, FUNDING, ROLES
from marketplace.devnet.private import write_private
from settlement.chain import Chain
from settlement.deploy import Contracts, DeployParams, deploy


@dataclass
class Devnet:
    """A local anvil with the contracts deployed, roles granted and the demo accounts funded."""

    anvil: Anvil
    contracts: Contracts
    accounts: dict[str, LocalAccount]  # by role, see market.ROLES
    deployment_file: Path

    @property
    def rpc_url(self) -> str:
        return self.anvil.url

    @property
    def chain_id(self) -> int:
        return self.contracts.chain.chain_id

    @property
    def devnet_file(self) -> Path:
        return devnet_file_of(self.deployment_file)

    def write(self, **services: Any) -> Path:
        """Writes the devnet file: the chain, the demo accounts with their keys, and ``services`` (URLs
        of what runs beside the chain, for `strata demo`); and each account's key file. All are 0600."""
        record = {
            "rpc_url": self.rpc_url,
            "chain_id": self.chain_id,
            "deployment_file": str(self.deployment_file),
            **services,
            "accounts": {
                role: {"address": a.address, "key": key_hex(a)} for role, a in self.accounts.items()
            },
        }
        write_private(self.devnet_file, json.dumps(record, indent=2) + "\n")
        for role, account in self.accounts.items():
            write_private(self.key_file(role), key_hex(account) + "\n")
        return self.devnet_file

    def key_file(self, role: str) -> Path:
        """Where a role's development key is kept for `--key-file`: ``keys/ROLE.key`` beside the devnet file."""
        return self.devnet_file.with_name("keys") / f"{role}.key"


def key_hex(account: LocalAccount) -> str:
    return "0x" + bytes(account.key).hex()


def devnet_file_of(deployment_file: Path) -> Path:
    """Where the demo accounts are written: beside the deployment file."""
    return deployment_file.with_name("devnet.json")


def start_devnet(
    *,
    port: int,
    deployment_file: Path,
    params: DeployParams | None = None,
    status: Console,
    log_path: Path | None = None,
) -> Devnet:
    """Starts anvil on 127.0.0.1:``port``, deploys with one dev account per role (admin, operator, treasury,
    validator), funds the providers', clients' and validator's accounts, and writes the deployment and
    devnet files. Stops anvil again if any of that fails."""
    with status.status("Building the contracts…"):
        build_contracts()
    # A new chain, kept on disk while it runs so that a restarted anvil goes on from where it was.
    state_path = deployment_file.with_name("anvil-state.json")
    state_path.unlink(missing_ok=True)
    anvil = Anvil(port=port, accounts=len(ROLES), state_path=state_path, log_path=log_path)
    with status.status(f"Starting anvil on 127.0.0.1:{port}…"):
        anvil.start()
    try:
        accounts = dict(zip(ROLES, anvil.accounts, strict=True))
        chain = Chain(anvil.url)
        with status.status(f"Deploying to {chain.rpc_url} (chain {chain.chain_id})…"):
            contracts = deploy(
                chain,
                accounts["admin"],
                operator=accounts["operator"].address,
                treasury=accounts["treasury"].address,
                slasher=accounts["validator"].address,
                params=params or DeployParams(),
            )
        with status.status("Funding demo accounts…"):
            for role, account in accounts.items():
                if role.startswith(FUNDED_ROLES):
                    contracts.token.mint(accounts["admin"], to=account.address, amount=FUNDING)
        contracts.deployment.save(deployment_file)
        devnet = Devnet(anvil, contracts, accounts, deployment_file)
        devnet.write()
    except BaseException:
        anvil.stop()
        raise
    return devnet
