"""`strata up`: the whole marketplace on this machine (see :mod:`marketplace.devnet.up`), in the foreground,
until Ctrl-C.

Ctrl-C, SIGINT or SIGTERM stops everything, the processes that use a service before the service: providers and
worker (providers withdraw their asks from the gateway as they go), then the gateway, then Redis, then the
chain. A process that dies once everything is up is restarted after a back-off (see
:mod:`marketplace.devnet.supervisor`), and says so. One that dies during start-up stops everything, the tail of
its log printed, and the exit status is 1 (code ``service_exited``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from marketplace.cli.chain import accounts_table
from marketplace.cli.common import console, errors, fail, reported
from marketplace.devnet import market
from marketplace.devnet.chain import Devnet
from marketplace.devnet.errors import ServiceFailed
from marketplace.devnet.process import log_tail
from marketplace.devnet.supervisor import Interrupted, Supervisor, stop_on_signals
from marketplace.devnet.up import Options, port_in_use, start
from settlement.deploy import DeployParams


def up_command(
    port: Annotated[int, typer.Option(min=1, max=65535, help="the gateway's port on 127.0.0.1")] = 8000,
    chain_port: Annotated[int, typer.Option(min=1, max=65535, help="anvil's port on 127.0.0.1")] = 8545,
    epoch_seconds: Annotated[
        float, typer.Option(min=1, help="seconds between the settlement worker's epoch closes")
    ] = 60.0,
    state_dir: Annotated[
        Path, typer.Option(help="where deployment, devnet accounts, model, logs and database go")
    ] = Path(".strata"),
    unbonding_period: Annotated[
        int | None, typer.Option(min=0, help="StakeManager's unbonding period, seconds [default: 7 days]")
    ] = None,
    cheaters: Annotated[
        int,
        typer.Option(
            min=0,
            max=len(market.CHEATER_ROLES),
            help="extra providers that cheat, undercutting the honest ones' prices",
        ),
    ] = 0,
    cheat: Annotated[
        str, typer.Option(help="how the cheaters cheat (see worker.testing.cheats)")
    ] = "skip-layer",
    sample_rate: Annotated[
        float, typer.Option(min=0, max=1, help="probability that the validator re-executes a billed hop")
    ] = 1.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the summary as one JSON line once ready, then keep running")
    ] = False,
) -> None:
    """Start the whole marketplace locally (chain, broker, database, gateway, three providers, settlement
    worker) and keep it running until Ctrl-C. Try it with `strata demo`."""
    if port == chain_port:
        raise typer.BadParameter("the gateway and the chain need different ports", param_hint="--port")
    for what, number in (("--port", port), ("--chain-port", chain_port)):
        if port_in_use(number):
            fail(f"port {number} ({what}) is already in use on 127.0.0.1", "port_in_use", as_json=as_json)
    from worker.testing.cheats import CHEATS

    if cheat not in CHEATS or cheat == "copy-input":
        kinds = ", ".join(kind for kind in CHEATS if kind != "copy-input")
        raise typer.BadParameter(f"{cheat!r} is not one of {kinds}", param_hint="--cheat")
    params = DeployParams() if unbonding_period is None else DeployParams(unbonding_period_s=unbonding_period)
    options = Options(
        port, chain_port, epoch_seconds, state_dir.resolve(), params, cheaters, cheat, sample_rate
    )
    # Progress and the human summary go to stderr under --json, so stdout carries only the JSON line.
    out = errors if as_json else console
    supervisor = Supervisor(options.state_dir / "logs")
    failure: ServiceFailed | None = None
    with stop_on_signals() as ignore_signals:
        try:
            with reported(as_json=as_json):
                summary, devnet = start(supervisor, options, out)
            _announce(summary, devnet, options, as_json, out)
            supervisor.supervise(lambda message: out.print(message, highlight=False))
        except Interrupted:
            out.print("Stopping…")
        except ServiceFailed as exc:
            failure = exc
            tail = log_tail(exc.log)
            if tail:
                errors.print(f"[dim]last lines of {exc.log}:[/]")
                errors.print(tail, markup=False, highlight=False, soft_wrap=True)
        finally:
            ignore_signals()  # a second Ctrl-C must not cut the stopping short
            supervisor.stop_all()
    if failure is not None:
        fail(str(failure), failure.code, as_json=as_json)
    out.print("Stopped.")


def _announce(summary: dict[str, Any], devnet: Devnet, options: Options, as_json: bool, out: Console) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        sys.stdout.flush()
    services = Table(title="Strata is up")
    for column in ("service", "where", "log"):
        services.add_column(column, overflow="fold")
    services.add_row("gateway", summary["gateway_url"], summary["gateway"]["log"])
    services.add_row("chain", f"{summary['rpc_url']} (chain id {summary['chain_id']})", "")
    services.add_row("redis", summary["redis_url"], "")
    services.add_row("database", summary["database_url"], "")
    for provider in summary["providers"]:
        services.add_row(
            f"{provider['role']} layers {provider['layers']}",
            f"{provider['endpoint']} at {int(provider['pricePerMillion']):,} per M token-layers",
            provider["log"],
        )
    services.add_row(
        "settlement worker",
        f"epoch every {options.epoch_s:g} s, sampling {options.sample_rate:.0%} of hops for the validator",
        summary["worker"]["log"],
    )
    services.add_row(
        "validator", "re-executes the sampled hops, in a process of its own", summary["validator"]["log"]
    )
    out.print(services)
    out.print(accounts_table(devnet))
    state = options.state_dir
    demo = "strata demo" if state == Path(".strata").resolve() else f"strata demo --state-dir {state}"
    out.print("[bold]Try it:[/]")
    out.print(f"  {demo}", highlight=False, soft_wrap=True)
    out.print(
        f"  curl -i {summary['gateway_url']}/v1/chat/completions -H 'content-type: application/json' "
        f'-d \'{{"model": "{market.MODEL_NAME}", "messages": [{{"role": "user", "content": "hello"}}], '
        '"max_tokens": 8}\'   [dim]# a 402 with the quote in PAYMENT-REQUIRED[/]',
        highlight=False,
        soft_wrap=True,
    )
    # The key stays in its file (0600): a key typed on a command line is seen by `ps` and kept in shell history.
    client_key_file = summary["accounts"]["client-1"]["key_file"]
    out.print(
        f"  export RPC_URL={summary['rpc_url']} DEPLOYMENT_FILE={summary['deployment_file']} "
        f"GATEWAY_URL={summary['gateway_url']}",
        highlight=False,
        soft_wrap=True,
    )
    out.print(
        f"  strata client deposit 10 --key-file {client_key_file} && "
        f'strata client ask "hello" --model {market.MODEL_NAME} --key-file {client_key_file}',
        highlight=False,
        soft_wrap=True,
    )
    out.print("Press Ctrl-C to stop.")
