"""What every `strata` command shares: argument parsing, error reporting, output for people and scripts."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal, Inexact, InvalidOperation, localcontext
from typing import Any, NoReturn
from urllib.parse import urlparse

import typer
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import is_address, to_checksum_address
from rich.console import Console

from settlement.deploy import TOKEN_DECIMALS
from settlement.errors import SettlementError, TransactionReverted

console = Console()
errors = Console(stderr=True)

EXIT_FAILED = 1  # the operation was refused or failed (a revert, an unreachable chain, bad configuration)
EXIT_USAGE = 2  # the arguments were wrong; typer uses the same code for its own usage errors


def parse_rpc_url(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise typer.BadParameter(f"{value!r} is not an http(s) JSON-RPC URL")
    return value


def parse_http_url(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise typer.BadParameter(f"{value!r} is not an http(s) URL")
    return value.rstrip("/")


def parse_address(value: str) -> str:
    if not is_address(value):
        raise typer.BadParameter(f"{value!r} is not an Ethereum address")
    return to_checksum_address(value)


def parse_key(value: str) -> LocalAccount:
    text = value.removeprefix("0x")
    if len(text) != 64:
        raise typer.BadParameter("a private key is 32 bytes of hex")
    try:
        account: LocalAccount = Account.from_key(bytes.fromhex(text))
    except ValueError as exc:
        raise typer.BadParameter(f"not a usable private key: {exc}") from exc
    return account


def parse_amount(text: str) -> int:
    """A token amount like ``12.5`` in base units; at most TOKEN_DECIMALS decimals."""
    try:
        value = Decimal(text)
    except InvalidOperation as exc:
        raise typer.BadParameter(f"{text!r} is not an amount") from exc
    with localcontext() as context:
        context.traps[Inexact] = True  # a rounded product would be another amount than the one typed
        try:
            units = value * 10**TOKEN_DECIMALS
            valid = value.is_finite() and value > 0 and units == units.to_integral_value()
        except ArithmeticError:  # sNaN, an overflowing exponent, more digits than the context holds
            valid = False
    if not valid:
        raise typer.BadParameter(f"{text!r} must be positive with at most {TOKEN_DECIMALS} decimals")
    return int(units)


def tokens(amount: int) -> str:
    """Base units as tokens for people: ``12,500.000000``."""
    return f"{Decimal(amount) / 10**TOKEN_DECIMALS:,.6f}"


def fail(message: str, code: str, *, as_json: bool = False) -> NoReturn:
    if as_json:
        console.print_json(json.dumps({"error": {"code": code, "message": message}}))
    else:
        errors.print(f"[bold red]error[/] [dim]({code})[/] {message}")
    raise typer.Exit(EXIT_FAILED)


@contextmanager
def reported(*, as_json: bool = False, reverts: Mapping[str, str] | None = None) -> Iterator[None]:
    """Turns settlement errors into a clear message, a stable code and exit status 1.

    ``reverts`` gives a contract's custom errors, by name, the codes a command reports them under (a
    StakeBelowMinimum revert as ``stake_below_minimum``, say); other reverts keep ``transaction_reverted``."""
    try:
        yield
    except TransactionReverted as exc:
        fail(str(exc), (reverts or {}).get(exc.error_name or "", exc.code), as_json=as_json)
    except SettlementError as exc:
        fail(str(exc), exc.code, as_json=as_json)


def emit_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))
