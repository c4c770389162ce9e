"""`strata client`: fund a payment channel, ask a model and pay per request, see the balance, withdraw.

The client's channel is remembered in ``.strata/channels.json`` (per escrow and payer), so successive commands
pay from the same channel; ``deposit --new-channel`` opens another, as does a deposit after a withdrawal.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from eth_account.signers.local import LocalAccount
from pydantic import Field, SecretStr
from rich.table import Table

from marketplace.cli.common import (
    console,
    emit_json,
    errors,
    fail,
    parse_amount,
    parse_http_url,
    reported,
    tokens,
)
from marketplace.cli.keys import KeyFileOption, KeystoreOption, require_account
from marketplace.client import ChannelWallet, PaymentFailed, StrataClient, fund_channel
from marketplace.gateway.payments.x402 import VOUCHER, network_of
from settlement.chain import Chain
from settlement.config import ChainSettings
from settlement.contracts import random_channel_id
from settlement.deploy import Contracts, Deployment

app = typer.Typer(help="Pay per request from a payment channel.", no_args_is_help=True)


class ClientSettings(ChainSettings):
    client_key: SecretStr | None = Field(default=None, description="the paying account's hex private key")
    gateway_url: str = Field(default="http://127.0.0.1:8000", description="the gateway to ask")
    channel_file: Path = Field(
        default=Path(".strata/channels.json"), description="where channel ids are kept"
    )


JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


class Session:
    """The account, the contracts and the remembered channel a command works with."""

    def __init__(self, key_file: Path | None, keystore: Path | None, as_json: bool) -> None:
        self.settings = ClientSettings()
        self.account: LocalAccount = require_account(
            key_file=key_file,
            keystore=keystore,
            env_key=self.settings.client_key,
            env_name="CLIENT_KEY",
            role="client",
            as_json=as_json,
        )
        self.gateway_url = parse_http_url(self.settings.gateway_url)
        with reported(as_json=as_json):
            chain = Chain(self.settings.rpc_url, request_timeout_s=self.settings.rpc_timeout_s)
            self.contracts = Contracts.load(chain, Deployment.load(self.settings.deployment_file))

    @property
    def _key(self) -> str:
        return f"{self.contracts.escrow.address}:{self.account.address}"

    def _saved(self) -> dict[str, str]:
        path = self.settings.channel_file
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except json.JSONDecodeError:
            data = {}
        return data if isinstance(data, dict) else {}

    def channel(self) -> bytes | None:
        saved = self._saved().get(self._key)
        return bytes.fromhex(saved[2:]) if saved else None

    def remember(self, channel: bytes) -> None:
        data = self._saved()
        data[self._key] = "0x" + channel.hex()
        self.settings.channel_file.parent.mkdir(parents=True, exist_ok=True)
        self.settings.channel_file.write_text(json.dumps(data, indent=2) + "\n")

    def wallet(self, channel: bytes, top_up: int) -> ChannelWallet:
        state = self.contracts.escrow.channel(channel)
        return ChannelWallet(
            self.account,
            channel,
            escrow=self.contracts.escrow.address,
            chain_id=self.contracts.chain.chain_id,
            deposit=state.deposit,
            fund=lambda amount: fund_channel(self.contracts, self.account, channel, amount),
            top_up=top_up,
        )


@app.command("deposit")
def deposit_command(
    amount: Annotated[str, typer.Argument(help="tokens to deposit, e.g. 25 or 2.5")],
    new_channel: Annotated[bool, typer.Option("--new-channel", help="open a fresh channel")] = False,
    key_file: KeyFileOption = None,
    keystore: KeystoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deposit into your payment channel, opening one if you have none (or yours is closing)."""
    units = parse_amount(amount)
    session = Session(key_file, keystore, as_json)
    channel = None if new_channel else session.channel()
    with reported(as_json=as_json):
        if channel is not None and session.contracts.escrow.channel(channel).withdrawable_at != 0:
            channel = None  # exiting or closed: it takes no deposits
        channel = channel or random_channel_id(session.account.address)
        balance = session.contracts.token.balance_of(session.account.address)
        if balance < units:
            fail(
                f"you hold {tokens(balance)} tokens, less than {tokens(units)}",
                "insufficient_balance",
                as_json=as_json,
            )
        with console.status("Depositing (approve, then deposit)…"):
            deposit = asyncio.run(fund_channel(session.contracts, session.account, channel, units))
    session.remember(channel)
    if as_json:
        emit_json({"channelId": "0x" + channel.hex(), "deposited": str(units), "deposit": str(deposit)})
        return
    console.print(f"Channel [bold]0x{channel.hex()}[/] now holds {tokens(deposit)} tokens.")


@app.command("ask")
def ask_command(
    prompt: Annotated[str, typer.Argument(help="what to ask")],
    model: Annotated[str, typer.Option(help="model name or root")],
    max_tokens: Annotated[int, typer.Option(min=1, max=32_768)] = 64,
    temperature: Annotated[float, typer.Option(min=0, max=2)] = 0.0,
    top_up: Annotated[
        str | None, typer.Option(help="tokens to deposit whenever the channel runs short")
    ] = None,
    key_file: KeyFileOption = None,
    keystore: KeystoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """Ask a model; the answer streams as it is generated and is paid from your channel."""
    top_up_units = parse_amount(top_up) if top_up else 0
    session = Session(key_file, keystore, as_json)
    channel = session.channel()
    if channel is None:
        fail("you have no channel: run `strata client deposit AMOUNT` first", "no_channel", as_json=as_json)
    with reported(as_json=as_json):
        wallet = session.wallet(channel, top_up_units)
    messages = [{"role": "user", "content": prompt}]
    options: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}

    async def run() -> dict[str, Any] | None:
        async with StrataClient(session.gateway_url, wallet) as strata:
            if as_json:
                return await strata.chat(model, messages, **options)
            async for text in strata.stream_chat(model, messages, **options):
                sys.stdout.write(text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return None

    try:
        answer = asyncio.run(run())
    except PaymentFailed as exc:
        fail(str(exc), exc.code or "request_failed", as_json=as_json)
    except httpx.HTTPError as exc:  # not an OSError: refused, timed out, or dropped mid-answer
        fail(f"{session.gateway_url} unreachable: {exc}", "gateway_unavailable", as_json=as_json)
    if answer is not None:
        emit_json(answer)
    else:
        errors.print(f"[dim]channel total charged: {tokens(wallet.charged)} tokens[/]")


@app.command("pay")
def pay_command(
    quote: Annotated[int, typer.Argument(min=1, help="the amount a 402 asked for, in base units")],
    key_file: KeyFileOption = None,
    keystore: KeystoreOption = None,
) -> None:
    """Print a PAYMENT-SIGNATURE header paying QUOTE from your channel, for curl and other plain clients.

    The voucher covers what the channel was charged so far plus QUOTE, read from the gateway just now; pay
    one request with it at a time."""
    session = Session(key_file, keystore, as_json=False)
    channel = session.channel()
    if channel is None:
        fail("you have no channel: run `strata client deposit AMOUNT` first", "no_channel")
    with reported():
        wallet = session.wallet(channel, 0)

    async def sign() -> str:
        async with StrataClient(session.gateway_url, wallet) as strata:
            state = await strata.channel()
        # Other requests in flight hold part of the channel: the voucher must cover them too.
        amount = await wallet.sign(quote, minimum=int(state["charged"]) + int(state["reserved"]) + quote)
        requirement = {
            "scheme": VOUCHER,
            "network": network_of(wallet.chain_id),
            "asset": session.contracts.token.address,
            "amount": str(quote),
            "payTo": wallet.escrow,
        }
        return wallet.header(amount, requirement)

    try:
        header = asyncio.run(sign())
    except PaymentFailed as exc:
        fail(str(exc), exc.code or "request_failed")
    except httpx.HTTPError as exc:
        fail(f"{session.gateway_url} unreachable: {exc}", "gateway_unavailable")
    sys.stdout.write(header + "\n")


@app.command("balance")
def balance_command(
    key_file: KeyFileOption = None, keystore: KeystoreOption = None, as_json: JsonOption = False
) -> None:
    """Your token balance and your channel: deposited, charged, reserved, available."""
    session = Session(key_file, keystore, as_json)
    channel = session.channel()
    with reported(as_json=as_json):
        held = session.contracts.token.balance_of(session.account.address)
        state = session.contracts.escrow.channel(channel) if channel else None
    report: dict[str, Any] = {"account": session.account.address, "balance": str(held), "channel": None}
    if channel is not None and state is not None:
        report["channel"] = {"channelId": "0x" + channel.hex(), "deposit": str(state.deposit)}
        try:
            wallet = session.wallet(channel, 0)

            async def read() -> dict[str, Any]:
                async with StrataClient(session.gateway_url, wallet) as strata:
                    return await strata.channel()

            report["channel"] = asyncio.run(read())
        except (PaymentFailed, httpx.HTTPError, OSError) as exc:
            report["channel"]["gateway"] = f"unreachable: {exc}"
    if as_json:
        emit_json(report)
        return
    table = Table(title=f"{session.account.address}")
    table.add_column("")
    table.add_column("tokens", justify="right")
    table.add_row("wallet balance", tokens(held))
    if report["channel"]:
        for name in ("deposit", "charged", "reserved", "available"):
            if name in report["channel"]:
                table.add_row(f"channel {name}", tokens(int(report["channel"][name])))
        console.print(f"Channel [bold]{report['channel']['channelId']}[/]")
    console.print(table)


@app.command("withdraw")
def withdraw_command(
    key_file: KeyFileOption = None, keystore: KeystoreOption = None, as_json: JsonOption = False
) -> None:
    """Leave your channel: the first call starts the exit, a call after the delay pays out what was not charged."""
    session = Session(key_file, keystore, as_json)
    channel = session.channel()
    if channel is None:
        fail("you have no channel", "no_channel", as_json=as_json)
    escrow = session.contracts.escrow
    with reported(as_json=as_json):
        state = escrow.channel(channel)
        now = session.contracts.chain.timestamp()
        if state.withdrawable_at == 0:
            with console.status("Starting the withdrawal…"):
                escrow.initiate_withdraw(session.account, channel=channel)
            state = escrow.channel(channel)
            result = {"status": "exiting", "withdrawableAt": state.withdrawable_at}
            message = f"Withdrawal started: finalize after {time.ctime(state.withdrawable_at)} by running this again."
        elif state.withdrawable_at == 2**256 - 1:
            fail("this channel is already closed", "channel_closed", as_json=as_json)
        elif now < state.withdrawable_at:
            result = {"status": "exiting", "withdrawableAt": state.withdrawable_at}
            message = f"Not yet: the channel can be withdrawn after {time.ctime(state.withdrawable_at)}."
        else:
            before = session.contracts.token.balance_of(session.account.address)
            with console.status("Withdrawing…"):
                escrow.finalize_withdraw(session.account, channel=channel)
            paid = session.contracts.token.balance_of(session.account.address) - before
            result = {"status": "closed", "withdrawn": str(paid)}
            message = f"Withdrew {tokens(paid)} tokens; the channel is closed."
    if as_json:
        emit_json({"channelId": "0x" + channel.hex(), **{k: str(v) for k, v in result.items()}})
        return
    console.print(message)
