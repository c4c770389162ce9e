"""`strata settlement`: close an epoch on demand and compare the ledger with the chain."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from marketplace.cli.common import console, emit_json, fail, reported, tokens
from settlement.chain import Chain
from settlement.config import SettlementSettings
from settlement.db.engine import blocking_sessions, create_blocking_engine
from settlement.deploy import Contracts, Deployment
from settlement.report import ledger_and_chain

app = typer.Typer(help="Settlement: epochs, the ledger, and what the chain holds.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


@app.command("close-epoch")
def close_epoch_command(
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for the settlement worker")] = 300,
    as_json: JsonOption = False,
) -> None:
    """Ask the settlement worker to close an epoch now, and wait for what it posted."""
    from settlement.tasks import CLOSE_EPOCH, make_app

    settings = SettlementSettings()
    if settings.redis_url is None:
        fail("no REDIS_URL: the settlement worker listens on Redis", "missing_redis", as_json=as_json)
    celery = make_app(settings)
    try:
        with console.status("Closing an epoch…"):
            result: dict[str, Any] = celery.send_task(CLOSE_EPOCH).get(timeout=timeout)
    except TimeoutError:
        fail(f"no answer from a settlement worker within {timeout:.0f} s", "worker_timeout", as_json=as_json)
    except Exception as exc:  # kombu and redis raise many kinds for an unreachable broker
        fail(f"close_epoch failed: {exc}", getattr(exc, "code", "close_epoch_failed"), as_json=as_json)
    if as_json:
        emit_json(result)
        return
    if result["status"] == "idle":
        console.print("Nothing was waiting to be settled: no epoch.")
        return
    console.print(
        f"Epoch [bold]{result['epoch']}[/] posted: root {result['root']}, "
        f"{tokens(int(result['settled']))} settled over {result['channels']} channels"
    )


@app.command("ledger")
def ledger_command(as_json: JsonOption = False) -> None:
    """The ledger's totals beside the chain's: they agree after every epoch."""
    settings = SettlementSettings()
    with reported(as_json=as_json):
        chain = Chain(settings.rpc_url, request_timeout_s=settings.rpc_timeout_s)
        contracts = Contracts.load(chain, Deployment.load(settings.deployment_file))
        engine = create_blocking_engine(settings.database_url)
        try:
            figures = ledger_and_chain(blocking_sessions(engine), contracts)
        finally:
            engine.dispose()
    if as_json:
        emit_json(figures.as_json())
        return
    table = Table(title=f"Ledger and chain after epoch {figures.epoch}")
    for column in ("ledger", "sUSD", "chain", "sUSD ", "match"):
        table.add_column(column, justify="right" if column.startswith("sUSD") else "left")
    for ledger_name, ledger, chain_name, on_chain in figures.rows():
        table.add_row(
            ledger_name, tokens(ledger), chain_name, tokens(on_chain), "yes" if ledger == on_chain else "NO"
        )
    console.print(table)
    console.print(f"Metered and waiting for the next epoch: {tokens(figures.pending)}")
    if not figures.matches:
        raise typer.Exit(1)
