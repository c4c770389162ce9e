"""What every `strata` command shares: argument parsing, error reporting, output for people and scripts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn
from urllib.parse import urlparse

import typer
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import is_address, to_checksum_address
from rich.console import Console

from settlement.errors import SettlementError

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


def fail(message: str, code: str, *, as_json: bool = False) -> NoReturn:
    if as_json:
        console.print_json(json.dumps({"error": {"code": code, "message": message}}))
    else:
        errors.print(f"[bold red]error[/] [dim]({code})[/] {message}")
    raise typer.Exit(EXIT_FAILED)


@contextmanager
def reported(*, as_json: bool = False) -> Iterator[None]:
    """Turns settlement errors into a clear message, a stable code and exit status 1."""
    try:
        yield
    except SettlementError as exc:
        fail(str(exc), exc.code, as_json=as_json)


def emit_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))
