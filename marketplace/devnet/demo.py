"""The demo's moves against a running `strata up`, as `strata demo` plays them: connecting through the devnet
file, reading balances, paying a streamed answer, waiting for validation, closing an epoch on demand and
claiming a payout. `strata demo` (marketplace.cli.demo) shows them to people."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount
from rich.console import Console

from marketplace.client import ChannelWallet, PaymentFailed, StrataClient, stream_chunks
from marketplace.gateway.payments.x402 import PAYMENT_REQUIRED, PAYMENT_RESPONSE, VOUCHER, decode_header
from settlement.chain import Chain
from settlement.config import SettlementSettings
from settlement.db.engine import blocking_sessions, create_blocking_engine
from settlement.deploy import Contracts, Deployment
from settlement.errors import SettlementError
from settlement.report import LedgerAndChain, ledger_and_chain

NOT_RUNNING = "marketplace_not_running"
PROVIDERS = ("provider-1", "provider-2", "provider-3")
CLIENT = "client-1"
CLAIMANT = "provider-1"


class DemoFailed(Exception):
    """A step could not be done; ``code`` is the stable code the command exits with."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Marketplace:
    """A running `strata up`, as its devnet file describes it."""

    devnet: dict[str, Any]
    contracts: Contracts
    gateway_url: str
    redis_url: str
    database_url: str
    model: str

    def account(self, role: str) -> LocalAccount:
        account: LocalAccount = Account.from_key(self.devnet["accounts"][role]["key"])
        return account


def connect(state_dir: Path) -> Marketplace:
    """Reads the devnet file and checks that the gateway and the chain answer."""
    path = state_dir / "devnet.json"
    try:
        devnet = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DemoFailed(f"no {path}: start the marketplace with `strata up` first", NOT_RUNNING) from exc
    except json.JSONDecodeError as exc:
        raise DemoFailed(f"{path} is not a devnet file: {exc}", NOT_RUNNING) from exc
    if not isinstance(devnet, dict) or "gateway_url" not in devnet:
        raise DemoFailed(
            f"{path} describes a chain without a marketplace (`strata chain up`?): run `strata up`",
            NOT_RUNNING,
        )
    gateway_url = str(devnet["gateway_url"])
    try:
        health = httpx.get(f"{gateway_url}/health", timeout=5.0)
    except httpx.HTTPError as exc:
        raise DemoFailed(
            f"the gateway at {gateway_url} does not answer ({exc}): is `strata up` running?", NOT_RUNNING
        ) from exc
    if health.status_code != 200:
        raise DemoFailed(f"the gateway at {gateway_url} is not healthy: {health.text[:200]}", NOT_RUNNING)
    try:
        chain = Chain(devnet["rpc_url"], request_timeout_s=5.0)
        contracts = Contracts.load(chain, Deployment.load(Path(devnet["deployment_file"])))
    except SettlementError as exc:
        raise DemoFailed(f"the chain at {devnet['rpc_url']} cannot be used: {exc}", NOT_RUNNING) from exc
    return Marketplace(
        devnet,
        contracts,
        gateway_url,
        str(devnet["redis_url"]),
        str(devnet["database_url"]),
        str(devnet["model"]["name"]),
    )


# -- figures -----------------------------------------------------------------------------------------------


def balances(market: Marketplace, channel: bytes) -> dict[str, Any]:
    """Every balance the demo moves, as decimal strings of base units."""
    token, escrow, distributor = market.contracts.token, market.contracts.escrow, market.contracts.distributor
    client = market.account(CLIENT).address
    state = escrow.channel(channel)
    figures: dict[str, Any] = {
        CLIENT: {
            "address": client,
            "balance": str(token.balance_of(client)),
            "channelDeposit": str(state.deposit),
            "channelClaimed": str(state.claimed),
        }
    }
    for role in PROVIDERS:
        address = market.account(role).address
        figures[role] = {
            "address": address,
            "balance": str(token.balance_of(address)),
            "claimed": str(distributor.claimed(address)),
        }
    treasury = market.account("treasury").address
    figures["treasury"] = {"address": treasury, "balance": str(token.balance_of(treasury))}
    figures["distributor"] = {
        "address": distributor.address,
        "balance": str(token.balance_of(distributor.address)),
        "funded": str(distributor.funded()),
        "providerTotal": str(distributor.provider_total()),
        "feesPaid": str(distributor.fees_paid()),
        "totalClaimed": str(distributor.total_claimed()),
        "epoch": distributor.epoch(),
    }
    return figures


def ledger_beside_chain(market: Marketplace) -> LedgerAndChain:
    engine = create_blocking_engine(market.database_url)
    try:
        return ledger_and_chain(blocking_sessions(engine), market.contracts)
    finally:
        engine.dispose()


# -- the steps ---------------------------------------------------------------------------------------------


def unpaid_quote(market: Marketplace, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sends the request without payment: the gateway answers 402 with what it would cost at most."""
    try:
        response = httpx.post(f"{market.gateway_url}/v1/chat/completions", json=body, timeout=30.0)
    except httpx.HTTPError as exc:
        raise DemoFailed(f"{market.gateway_url} unreachable: {exc}", "gateway_unavailable") from exc
    if response.status_code != 402 or PAYMENT_REQUIRED not in response.headers:
        raise DemoFailed(
            f"expected 402 with a quote, got HTTP {response.status_code}: {response.text[:200]}",
            "unexpected_response",
        )
    required = decode_header(response.headers[PAYMENT_REQUIRED])
    voucher = next((r for r in required.get("accepts", []) if r.get("scheme") == VOUCHER), None)
    if voucher is None:
        raise DemoFailed("the gateway offers no voucher payment", "no_requirement")
    return required, voucher


@dataclass
class Answer:
    text: str
    reserved: dict[str, Any] | None  # PAYMENT-RESPONSE as the stream began
    settled: dict[str, Any]  # the stream's last chunk's payment: what it was charged


async def _stream(
    market: Marketplace, wallet: ChannelWallet, body: dict[str, Any], out: Console, echo: bool
) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
    """Sends the request again through the SDK, which pays the 402 with a voucher, and streams the answer."""
    text: list[str] = []
    reserved = settled = None
    streamed = {**body, "stream": True}
    async with (
        StrataClient(market.gateway_url, wallet) as strata,
        strata.http.stream("POST", "/v1/chat/completions", json=streamed) as response,
    ):
        if response.status_code != 200:
            await response.aread()
            raise PaymentFailed(f"HTTP {response.status_code}: {response.text[:200]}")
        header = response.headers.get(PAYMENT_RESPONSE)
        reserved = decode_header(header) if header else None
        async for chunk in stream_chunks(response):
            if isinstance(chunk.get("payment"), dict):
                settled = chunk["payment"]
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    text.append(piece)
                    if echo:
                        out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
    if echo:
        out.print()
    return "".join(text), reserved, settled


def paid_stream(
    market: Marketplace, wallet: ChannelWallet, body: dict[str, Any], out: Console, echo: bool
) -> Answer:
    """The paid, streamed request (``echo`` prints the text as it comes); refused or unpriced, it fails."""
    try:
        text, reserved, settled = asyncio.run(_stream(market, wallet, body, out, echo))
    except PaymentFailed as exc:
        raise DemoFailed(str(exc), exc.code or "request_failed") from exc
    except httpx.HTTPError as exc:  # refused, timed out, or dropped mid-answer
        raise DemoFailed(f"{market.gateway_url} failed mid-answer: {exc}", "gateway_unavailable") from exc
    if settled is None:
        raise DemoFailed("the answer ended without saying what it cost", "unsettled")
    return Answer(text, reserved, settled)


def wait_cleared(market: Marketplace, job_id: str, timeout_s: float) -> None:
    """Waits until the job's sampled hops are validated (an epoch settles only cleared jobs)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            job = httpx.get(f"{market.gateway_url}/v1/jobs/{job_id}", timeout=10).json()
        except (httpx.HTTPError, ValueError) as exc:
            raise DemoFailed(f"{market.gateway_url} did not answer: {exc}", "gateway_unavailable") from exc
        if job.get("cleared"):
            return
        time.sleep(0.25)
    raise DemoFailed(f"job {job_id} was not validated within {timeout_s:g} s", "validation_timeout")


def close_epoch(redis_url: str, timeout_s: float) -> dict[str, Any]:
    """Runs settlement's close_epoch task now, on the worker `strata up` started, and waits for its report."""
    from settlement.tasks import CLOSE_EPOCH, make_app

    app = make_app(SettlementSettings(redis_url=redis_url))
    try:
        report: dict[str, Any] = app.send_task(CLOSE_EPOCH).get(timeout=timeout_s)
    except Exception as exc:  # Celery re-raises the task's own error, or its broker's: many kinds
        raise DemoFailed(f"close_epoch failed: {exc!r}", "epoch_failed") from exc
    finally:
        app.close()
    return report


def payout(market: Marketplace, address: str) -> dict[str, Any]:
    """``GET /v1/payouts/{address}``: what the ledger says ``address`` earned and may claim, with the proof."""
    try:
        response = httpx.get(f"{market.gateway_url}/v1/payouts/{address}", timeout=30.0)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise DemoFailed(f"GET /v1/payouts/{address} failed: {exc}", "gateway_unavailable") from exc
    body: dict[str, Any] = response.json()
    return body


def claim(market: Marketplace, claimant: LocalAccount, due: dict[str, Any]) -> str:
    """Claims ``due`` (a payout as the gateway serves it) from the distributor; returns the transaction hash."""
    receipt = market.contracts.distributor.claim(
        claimant,
        provider=claimant.address,
        cumulative_amount=int(due["cumulativeAmount"]),
        proof=[bytes.fromhex(node.removeprefix("0x")) for node in due["proof"]],
        expected_root=bytes.fromhex(str(due["root"]).removeprefix("0x")),
    )
    return "0x" + bytes(receipt["transactionHash"]).hex()


# -- output ------------------------------------------------------------------------------------------------
