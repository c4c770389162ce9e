"""`strata chain`: deploy the contracts anywhere, or run a funded local chain."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.table import Table

from marketplace.cli.common import (
    console,
    emit_json,
    parse_address,
    parse_rpc_url,
    reported,
)
from marketplace.cli.keys import KeyFileOption, KeystoreOption, require_account
from marketplace.devnet.chain import Devnet, key_hex, start_devnet
from marketplace.devnet.contracts import build_contracts
from settlement.chain import Chain
from settlement.config import ChainSettings
from settlement.deploy import ONE_TOKEN, Contracts, DeployParams, deploy

app = typer.Typer(help="Deploy the contracts, or run a local chain with them.", no_args_is_help=True)


def accounts_table(devnet: Devnet) -> Table:
    table = Table(title="Demo accounts (development keys: never use them on a real network)")
    for column in ("role", "address", "private key", "sUSD"):
        table.add_column(column, overflow="fold")
    for role, account in devnet.accounts.items():
        balance = devnet.contracts.token.balance_of(account.address) / ONE_TOKEN
        table.add_row(role, account.address, key_hex(account), f"{balance:,.2f}")
    return table


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
    key_file: KeyFileOption = None,
    keystore: KeystoreOption = None,
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
    """Build (if the sources changed) and deploy the four contracts to any JSON-RPC endpoint, and write a deployment
    file."""
    settings = ChainSettings()
    rpc_url = parse_rpc_url(rpc or settings.rpc_url)
    deployer = require_account(
        key_file=key_file,
        keystore=keystore,
        env_key=settings.deployer_key,
        env_name="DEPLOYER_KEY",
        role="deployer",
        as_json=as_json,
    )
    params = DeployParams(
        token=parse_address(token) if token else None,
        min_stake=min_stake,
        unbonding_period_s=unbonding_period,
        withdraw_delay_s=withdraw_delay,
        challenger_bps=challenger_bps,
    )
    operator_address, treasury_address, slasher_address = (
        parse_address(given) if given else deployer.address for given in (operator, treasury, slasher)
    )
    with reported(as_json=as_json):
        with console.status("Building the contracts…"):
            build_contracts()
        chain = Chain(
            rpc_url, request_timeout_s=settings.rpc_timeout_s, receipt_timeout_s=settings.receipt_timeout_s
        )
        with console.status(f"Deploying to {chain.rpc_url} (chain {chain.chain_id})…"):
            contracts = deploy(
                chain,
                deployer,
                operator=operator_address,
                treasury=treasury_address,
                slasher=slasher_address,
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
        devnet = start_devnet(port=port, deployment_file=path, status=console)
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
