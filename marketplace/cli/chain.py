"""`strata chain`: deploy the contracts anywhere, or run a funded local chain."""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from eth_account.signers.local import LocalAccount
from rich.console import Console
from rich.table import Table

from marketplace.cli.common import (
    console,
    emit_json,
    fail,
    parse_address,
    parse_key,
    parse_rpc_url,
    reported,
)
from settlement.anvil import Anvil
from settlement.chain import Chain
from settlement.config import ChainSettings
from settlement.deploy import ONE_TOKEN, Contracts, DeployParams, deploy

app = typer.Typer(help="Deploy the contracts, or run a local chain with them.", no_args_is_help=True)

# anvil's dev accounts, by the role each plays on a local marketplace.
# The gateway has a key of its own: it signs job tickets and submits exact payments, while the operator's key
# (redeeming, posting roots, forwarding) belongs to the settlement worker; one key in two processes would race
# for nonces.
DEVNET_ROLES = (
    "admin", "operator", "treasury", "validator", "gateway",
    "provider-1", "provider-2", "provider-3",
    "client-1", "client-2", "client-3",
    "cheater-1", "cheater-2", "cheater-3",
)  # fmt: skip
DEVNET_FUNDING = 10_000 * ONE_TOKEN


@dataclass
class Devnet:
    """A local anvil with the contracts deployed, roles granted and the demo accounts funded."""

    anvil: Anvil
    contracts: Contracts
    accounts: dict[str, LocalAccount]  # by role, see DEVNET_ROLES
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
        of what runs beside the chain, for `strata demo`)."""
        record = {
            "rpc_url": self.rpc_url,
            "chain_id": self.chain_id,
            "deployment_file": str(self.deployment_file),
            **services,
            "accounts": {
                role: {"address": a.address, "key": key_hex(a)} for role, a in self.accounts.items()
            },
        }
        self.devnet_file.write_text(json.dumps(record, indent=2) + "\n")
        return self.devnet_file


def key_hex(account: LocalAccount) -> str:
    return "0x" + bytes(account.key).hex()


def devnet_file_of(deployment_file: Path) -> Path:
    """Where the demo accounts are written: beside the deployment file."""
    return deployment_file.with_name("devnet.json")


def start_devnet(
    *, port: int, deployment_file: Path, params: DeployParams | None = None, status: Console = console
) -> Devnet:
    """Starts anvil on 127.0.0.1:``port``, deploys with one dev account per role (admin, operator, treasury,
    validator), funds the providers', clients' and validator's accounts, and writes the deployment and
    devnet files. Stops anvil again if any of that fails."""
    anvil = Anvil(port=port, accounts=len(DEVNET_ROLES))
    with status.status(f"Starting anvil on 127.0.0.1:{port}…"):
        anvil.start()
    try:
        accounts = dict(zip(DEVNET_ROLES, anvil.accounts, strict=True))
        chain = Chain(anvil.url)
        contracts = _deploy_with_progress(
            chain,
            accounts["admin"],
            status=status,
            operator=accounts["operator"].address,
            treasury=accounts["treasury"].address,
            slasher=accounts["validator"].address,
            params=params or DeployParams(),
        )
        with status.status("Funding demo accounts…"):
            for role, account in accounts.items():
                if role.startswith(("provider", "client", "validator", "cheater")):
                    contracts.token.mint(accounts["admin"], to=account.address, amount=DEVNET_FUNDING)
        contracts.deployment.save(deployment_file)
        devnet = Devnet(anvil, contracts, accounts, deployment_file)
        devnet.write()
    except BaseException:
        anvil.stop()
        raise
    return devnet


def accounts_table(devnet: Devnet) -> Table:
    table = Table(title="Demo accounts (development keys: never use them on a real network)")
    for column in ("role", "address", "private key", "sUSD"):
        table.add_column(column, overflow="fold")
    for role, account in devnet.accounts.items():
        balance = devnet.contracts.token.balance_of(account.address) / ONE_TOKEN
        table.add_row(role, account.address, key_hex(account), f"{balance:,.2f}")
    return table


def _deploy_with_progress(
    chain: Chain, deployer: LocalAccount, *, status: Console = console, **kwargs: Any
) -> Contracts:
    with status.status(f"Compiling and deploying to {chain.rpc_url} (chain {chain.chain_id})…"):
        return deploy(chain, deployer, **kwargs)


def _contracts_table(contracts: Contracts) -> Table:
    table = Table(title=f"Contracts on chain {contracts.deployment.chain_id}")
    table.add_column("contract")
    table.add_column("address")
    for name, address in contracts.deployment.addresses.items():
        table.add_row(name, address)
    return table


@app.command("deploy")
def deploy_command(
    rpc: Annotated[str | None, typer.Option("--rpc", help="JSON-RPC URL [default: RPC_URL]")] = None,
    key: Annotated[
        str | None, typer.Option(help="deployer's hex private key [default: DEPLOYER_KEY]")
    ] = None,
    operator: Annotated[
        str | None, typer.Option(help="redeems vouchers, posts roots [default: deployer]")
    ] = None,
    treasury: Annotated[str | None, typer.Option(help="receives platform fees [default: deployer]")] = None,
    slasher: Annotated[
        str | None, typer.Option(help="the validator allowed to slash [default: deployer]")
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="an existing ERC-20 (e.g. USDC); omit to deploy one")
    ] = None,
    min_stake: Annotated[int, typer.Option(min=0, help="minimum provider stake, base units")] = 100
    * ONE_TOKEN,
    unbonding_period: Annotated[int, typer.Option(min=0, help="seconds")] = 7 * 24 * 3600,
    withdraw_delay: Annotated[int, typer.Option(min=0, help="seconds")] = 24 * 3600,
    challenger_bps: Annotated[
        int, typer.Option(min=0, max=10_000, help="validator's share of a slash")
    ] = 5_000,
    out: Annotated[Path | None, typer.Option(help="deployment file [default: DEPLOYMENT_FILE]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the deployment as JSON")] = False,
) -> None:
    """Compile and deploy the four contracts to any JSON-RPC endpoint and write a deployment file."""
    settings = ChainSettings()
    rpc_url = parse_rpc_url(rpc or settings.rpc_url)
    key_text = key or (settings.deployer_key.get_secret_value() if settings.deployer_key else None)
    if key_text is None:
        fail("no deployer key: pass --key or set DEPLOYER_KEY", "missing_key", as_json=as_json)
    deployer = parse_key(key_text)
    params = DeployParams(
        token=parse_address(token) if token else None,
        min_stake=min_stake,
        unbonding_period_s=unbonding_period,
        withdraw_delay_s=withdraw_delay,
        challenger_bps=challenger_bps,
    )
    with reported(as_json=as_json):
        chain = Chain(
            rpc_url, request_timeout_s=settings.rpc_timeout_s, receipt_timeout_s=settings.receipt_timeout_s
        )
        contracts = _deploy_with_progress(
            chain,
            deployer,
            operator=parse_address(operator) if operator else deployer.address,
            treasury=parse_address(treasury) if treasury else deployer.address,
            slasher=parse_address(slasher) if slasher else deployer.address,
            params=params,
        )
    path = out or settings.deployment_file
    contracts.deployment.save(path)
    if as_json:
        emit_json(json.loads(path.read_text()))
        return
    console.print(_contracts_table(contracts))
    console.print(f"Deployment written to [bold]{path}[/]")


@app.command("up")
def up_command(
    port: Annotated[int, typer.Option(min=1, max=65535, help="port for anvil on 127.0.0.1")] = 8545,
    out: Annotated[Path | None, typer.Option(help="deployment file [default: DEPLOYMENT_FILE]")] = None,
) -> None:
    """Start a local anvil, deploy, fund demo accounts, and keep the chain running until Ctrl-C."""
    path = out or ChainSettings().deployment_file
    with reported():
        devnet = start_devnet(port=port, deployment_file=path)
    console.print(_contracts_table(devnet.contracts))
    console.print(accounts_table(devnet))
    console.print(f"Chain: [bold]{devnet.rpc_url}[/] (chain id {devnet.chain_id})")
    console.print(f"Deployment: [bold]{path}[/]   Demo accounts: [bold]{devnet.devnet_file}[/]")
    console.print("Press Ctrl-C to stop.")
    # SIGTERM interrupts the wait like Ctrl-C: stopping anvil inside the handler would wait for the process
    # that the interrupted wait is still reaping, and hang.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        devnet.anvil.wait()
    except KeyboardInterrupt:
        pass
    finally:
        devnet.anvil.stop()


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt
