"""`strata demo`: one paid request through a running `strata up`, from the client's first 402 to a provider's
claim on chain, with every balance before and after and the ledger beside the chain.

It reads what `strata up` wrote to ``devnet.json`` in the state directory (the URLs and the development keys),
and plays two parts: client-1, which opens a payment channel and pays a streamed answer with a voucher, and
provider-1, which claims its payout once an epoch has settled. In between it closes an epoch on demand, as the
settlement worker does on its schedule.

The ledger-vs-chain check is :mod:`settlement.report`'s, which says why the treasury has a leaf of its own.

Exit status: 0 when every figure matches, 1 with a stable code otherwise (``marketplace_not_running`` when
there is no marketplace to talk to, ``ledger_mismatch`` when the books disagree).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from marketplace.cli.common import console, emit_json, errors, fail, parse_amount, reported, tokens
from marketplace.client import ChannelWallet, fund_channel
from marketplace.devnet.demo import (
    CLAIMANT,
    CLIENT,
    PROVIDERS,
    DemoFailed,
    Marketplace,
    balances,
    claim,
    close_epoch,
    connect,
    ledger_beside_chain,
    paid_stream,
    payout,
    unpaid_quote,
    wait_cleared,
)
from settlement.contracts import random_channel_id


def _balances_table(title: str, figures: dict[str, Any]) -> Table:
    table = Table(title=title)
    for column in ("account", "address", "sUSD balance", "detail"):
        table.add_column(column, overflow="fold")
    client = figures[CLIENT]
    table.add_row(
        CLIENT,
        client["address"],
        tokens(int(client["balance"])),
        f"channel deposit {tokens(int(client['channelDeposit']))}, claimed {tokens(int(client['channelClaimed']))}",
    )
    for role in PROVIDERS:
        row = figures[role]
        table.add_row(
            role, row["address"], tokens(int(row["balance"])), f"claimed {tokens(int(row['claimed']))}"
        )
    table.add_row("treasury", figures["treasury"]["address"], tokens(int(figures["treasury"]["balance"])), "")
    d = figures["distributor"]
    table.add_row(
        "distributor",
        d["address"],
        tokens(int(d["balance"])),
        f"epoch {d['epoch']}, funded {tokens(int(d['funded']))}, providerTotal {tokens(int(d['providerTotal']))}, "
        f"feesPaid {tokens(int(d['feesPaid']))}",
    )
    return table


def _document_table(title: str, document: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("field", style="dim")
    table.add_column("value", overflow="fold")
    flat = {**{k: v for k, v in document.items() if k != "extra"}, **(document.get("extra") or {})}
    for key, value in flat.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    return table


def _checks_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Ledger vs chain (posted epochs)")
    for column in ("ledger", "sUSD", "chain", "sUSD ", "match"):
        table.add_column(column, overflow="fold", justify="right" if column.startswith("sUSD") else "left")
    for row in rows:
        table.add_row(
            row["ledgerFigure"],
            tokens(int(row["ledger"])),
            row["chainFigure"],
            tokens(int(row["chain"])),
            "[green]yes[/]" if row["match"] else "[bold red]NO[/]",
        )
    return table


# -- the command -------------------------------------------------------------------------------------------


def demo_command(
    state_dir: Annotated[Path, typer.Option(help="the state directory `strata up` writes")] = Path(".strata"),
    prompt: Annotated[str, typer.Option(help="what client-1 asks")] = "Tell me about layer-split inference.",
    max_tokens: Annotated[int, typer.Option(min=1, max=512)] = 24,
    deposit: Annotated[str, typer.Option(help="tokens client-1 deposits into its new channel")] = "10",
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for the epoch to close")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead")] = False,
) -> None:
    """Play a client and a provider against a running `strata up`: a 402, a voucher-paid streamed answer, an
    epoch settled on chain, a claimed payout, and the ledger checked against the chain."""
    deposit_units = parse_amount(deposit)
    # Progress goes to stderr under --json, so stdout carries only the report.
    out = errors if as_json else console
    try:
        with reported(as_json=as_json):
            report = _play(connect(state_dir), deposit_units, prompt, max_tokens, timeout, out, as_json)
    except DemoFailed as exc:
        fail(str(exc), exc.code, as_json=as_json)
    if as_json:
        emit_json(report)
    else:
        out.print(_balances_table("After", report["after"]))
        out.print(_checks_table(report["checks"]))
        out.print(
            "[dim]The treasury's leaf is the per-hop rounding residue: it stays in the providers' pool on chain, "
            "claimable by the treasury.[/]"
        )
    if not report["ok"]:
        if as_json:
            raise typer.Exit(1)  # the report says which figure differs
        fail("the ledger and the chain disagree", "ledger_mismatch")


def _play(
    market: Marketplace,
    deposit: int,
    prompt: str,
    max_tokens: int,
    timeout_s: float,
    out: Console,
    as_json: bool,
) -> dict[str, Any]:
    """The six steps; returns the report. Tables are printed as it goes unless ``as_json``."""
    show = (lambda *_args, **_kwargs: None) if as_json else out.print
    client, claimant = market.account(CLIENT), market.account(CLAIMANT)
    channel = random_channel_id(client.address)
    report: dict[str, Any] = {
        "client": client.address,
        "channelId": "0x" + channel.hex(),
        "model": market.model,
    }

    out.rule("1. Balances before")
    report["before"] = balances(market, channel)
    show(_balances_table("Before", report["before"]))

    out.rule("2. A request without payment")
    body = {
        "model": market.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    required, voucher = unpaid_quote(market, body)
    report["paymentRequired"] = required
    show(f"HTTP 402 Payment Required: PAYMENT-REQUIRED offers {len(required['accepts'])} way(s) to pay.")
    show(_document_table("The voucher quote", voucher))

    out.rule("3. Open a channel and pay with a voucher")
    with out.status(f"Depositing {tokens(deposit)} sUSD into channel 0x{channel.hex()[:16]}…"):
        held = asyncio.run(fund_channel(market.contracts, client, channel, deposit))
    escrow, chain_id = market.contracts.escrow.address, market.contracts.chain.chain_id
    wallet = ChannelWallet(client, channel, escrow=escrow, chain_id=chain_id, deposit=held)
    show(f"[bold]{client.address}[/] asks {market.model!r}: {prompt}")
    show("[dim](the demo model has random weights: expect gibberish, paid for all the same)[/]")
    answer = paid_stream(market, wallet, body, out, echo=not as_json)
    report.update(answer=answer.text, paymentReserved=answer.reserved, payment=answer.settled)
    report["charged"] = str(answer.settled["extra"]["charged"])
    if answer.reserved:
        show(_document_table("PAYMENT-RESPONSE (as the stream began)", answer.reserved))
    show(_document_table("Payment (the stream's last chunk)", answer.settled))

    out.rule("4. Close an epoch")
    with out.status("Waiting for metering and validation of the job…"):
        wait_cleared(market, str(answer.settled["extra"]["jobId"]), timeout_s)
    with out.status("Settling: redeeming vouchers, posting the payout root…"):
        report["epoch"] = close_epoch(market.redis_url, timeout_s)
    show(_document_table("close_epoch", report["epoch"]))

    out.rule(f"5. {CLAIMANT} claims its payout")
    due = report["payout"] = payout(market, claimant.address)
    claimable = int(due["claimable"])
    report["claim"] = None
    if claimable > 0:
        with out.status(f"Claiming {tokens(claimable)} sUSD with a proof of {len(due['proof'])} nodes…"):
            report["claim"] = {"amount": str(claimable), "tx": claim(market, claimant, due)}
        show(f"{CLAIMANT} claimed [bold]{tokens(claimable)}[/] sUSD (tx {report['claim']['tx']}).")
    else:
        show(f"{CLAIMANT} has nothing to claim (settled {tokens(int(due['settled']))}, already claimed).")

    out.rule("6. Balances after, and the ledger beside the chain")
    report["after"] = balances(market, channel)
    figures = ledger_beside_chain(market)
    report["ledger"] = {
        "charges": str(figures.settled),
        "providerEarnings": str(figures.provider_earnings),
        "platformFees": str(figures.platform_fees),
        "treasuryLeaf": str(figures.treasury_leaf),
    }
    report["checks"] = figures.as_json()["checks"]
    report["ok"] = figures.matches
    return report
