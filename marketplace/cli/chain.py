"""`strata chain`: deploy the contracts anywhere, or run a funded local chain."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from eth_account.signers.local import LocalAccount
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
DEVNET_ROLES = (
    "admin", "operator", "treasury", "validator",
    "provider-1", "provider-2", "provider-3",
    "client-1", "client-2", "client-3",
)  # fmt: skip
DEVNET_FUNDING = 10_000 * ONE_TOKEN


def _deploy_with_progress(chain: Chain, deployer: LocalAccount, **kwargs: Any) -> Contracts:
    with console.status(f"Compiling and deploying to {chain.rpc_url} (chain {chain.chain_id})…"):
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
    settings = ChainSettings()
    anvil = Anvil(port=port, accounts=len(DEVNET_ROLES))
    with reported():
        with console.status(f"Starting anvil on 127.0.0.1:{port}…"):
            anvil.start()
        try:
            accounts = dict(zip(DEVNET_ROLES, anvil.accounts, strict=True))
            chain = Chain(anvil.url)
            contracts = _deploy_with_progress(
                chain,
                accounts["admin"],
                operator=accounts["operator"].address,
                treasury=accounts["treasury"].address,
                slasher=accounts["validator"].address,
            )
            with console.status("Funding demo accounts…"):
                for role, account in accounts.items():
                    if role.startswith(("provider", "client", "validator")):
                        contracts.token.mint(accounts["admin"], to=account.address, amount=DEVNET_FUNDING)
        except BaseException:
            anvil.stop()
            raise
    path = out or settings.deployment_file
    contracts.deployment.save(path)
    devnet_file = path.with_name("devnet.json")
    devnet_file.write_text(
        json.dumps(
            {
                "rpc_url": anvil.url,
                "accounts": {
                    r: {"address": a.address, "key": "0x" + a.key.hex()} for r, a in accounts.items()
                },
            },
            indent=2,
        )
        + "\n"
    )
    console.print(_contracts_table(contracts))
    table = Table(title="Demo accounts (development keys: never use them on a real network)")
    for column in ("role", "address", "private key", "sUSD"):
        table.add_column(column)
    for role, account in accounts.items():
        balance = contracts.token.balance_of(account.address) / ONE_TOKEN
        table.add_row(role, account.address, "0x" + account.key.hex(), f"{balance:,.2f}")
    console.print(table)
    console.print(f"Chain: [bold]{anvil.url}[/] (chain id {chain.chain_id})")
    console.print(f"Deployment: [bold]{path}[/]   Demo accounts: [bold]{devnet_file}[/]")
    console.print("Press Ctrl-C to stop.")
    signal.signal(signal.SIGTERM, lambda *_: anvil.stop())
    try:
        anvil.wait()
    except KeyboardInterrupt:
        pass
    finally:
        anvil.stop()
