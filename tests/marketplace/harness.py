"""A whole marketplace for tests: a private anvil with the contracts, provider processes over a tiny model,
and gateways served by uvicorn on real ports, on SQLite or PostgreSQL.

Nothing here is faked: providers are `strata provider serve` processes, the gateway is the real app, the chain
is anvil, and the databases are a SQLite file and a fresh PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import create_engine

from marketplace.client import ChannelWallet, StrataClient, fund_channel
from marketplace.devnet.anvil import Anvil
from marketplace.devnet.process import free_port
from marketplace.devnet.providers import ProviderLaunch
from marketplace.devnet.providers import ProviderProcess as NodeProcess
from marketplace.gateway.catalog import load_model
from marketplace.gateway.config import GatewaySettings
from marketplace.gateway.payments.x402 import (
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    decode_header,
    encode_header,
)
from marketplace.provider.announce import DEFAULT_RETENTION_S, AnnounceError, Announcer, Offer
from marketplace.provider.staking import bond
from marketplace.testing.gateway import GatewayServer
from settlement.chain import Chain
from settlement.contracts import random_channel_id
from settlement.db.engine import sync_url
from settlement.deploy import ONE_TOKEN, Contracts, DeployParams, deploy
from settlement.eip712 import Domain, TransferAuthorization, Voucher, voucher_domain
from worker.testing.tiny import write_tiny_checkpoint

STRATA = str(Path(sys.executable).with_name("strata"))
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
MIN_STAKE = 100 * ONE_TOKEN
PRICE = 1_000_000  # base units per million token-layers: one base unit per token-layer


@dataclass
class Market:
    anvil: Anvil
    contracts: Contracts
    deployment_file: Path
    admin: LocalAccount
    operator: LocalAccount
    gateway_key: LocalAccount
    providers: list[LocalAccount]
    clients: list[LocalAccount]


WITHDRAW_DELAY_S = 3_600


@contextmanager
def chain_clock_moved(market: Market, seconds: int) -> Iterator[None]:
    """The chain's clock ``seconds`` ahead for the body; then the chain goes back to where it was (an anvil
    snapshot), since later tests sign authorizations against the wall clock."""
    provider = market.contracts.chain.w3.provider
    snapshot = provider.make_request("evm_snapshot", [])["result"]  # type: ignore[arg-type]
    provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
    provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    try:
        yield
    finally:
        provider.make_request("evm_revert", [snapshot])  # type: ignore[arg-type]


def start_market(tmp: Path) -> Market:
    anvil = Anvil(accounts=12).start()
    a = anvil.accounts
    chain = Chain(anvil.url, receipt_timeout_s=30)
    contracts = deploy(
        chain,
        a[0],
        operator=a[1].address,
        treasury=a[2].address,
        slasher=a[3].address,
        # A withdraw delay longer than a test gateway's job lifetime (see gateway_settings); tests that close a
        # channel move the chain's clock inside chain_clock_moved.
        params=DeployParams(min_stake=MIN_STAKE, unbonding_period_s=3600, withdraw_delay_s=WITHDRAW_DELAY_S),
    )
    providers, clients = a[4:9], a[9:12]
    for account in [*providers, *clients]:
        contracts.token.mint(a[0], to=account.address, amount=10_000 * ONE_TOKEN)
    for provider in providers:
        bond(contracts, provider, MIN_STAKE)
    gateway_key = Account.from_key(b"\x42" * 32)
    # The gateway sends exact-scheme settlements, so it pays gas.
    chain.w3.provider.make_request("anvil_setBalance", [gateway_key.address, hex(10**21)])  # type: ignore[arg-type]
    deployment_file = tmp / "deployment.json"
    contracts.deployment.save(deployment_file)
    return Market(anvil, contracts, deployment_file, a[0], a[1], gateway_key, providers, clients)


@dataclass
class ProviderProcess:
    """A `strata provider serve` process, on TLS, for one of the market's provider accounts."""

    account: LocalAccount
    span: tuple[int, int]
    node: NodeProcess
    domain: Domain  # the deployment's protocol domain, which its asks are signed under

    @property
    def endpoint(self) -> str:
        return self.node.endpoint

    @property
    def fingerprint(self) -> bytes:
        return self.node.fingerprint

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.node.process

    def kill(self) -> None:
        self.node.kill()


def start_provider(
    model: Path,
    account: LocalAccount,
    span: tuple[int, int],
    market: Market,
    extra: Sequence[str] = (),
    *,
    log_dir: Path,
    env: dict[str, str] | None = None,
) -> ProviderProcess:
    launch = ProviderLaunch(
        model,
        f"{span[0]}:{span[1]}",
        free_port(),
        trust_gateway=market.gateway_key.address,
        deployment=market.deployment_file,
        tls_dir=log_dir / f"tls-{account.address}",
        retained_dir=log_dir / f"retained-{account.address}-{span[0]}-{span[1]}",
        extra=tuple(extra),
    )
    log = log_dir / f"provider-{account.address[:10]}-{span[0]}-{span[1]}-{launch.port}.log"
    node = NodeProcess.start(launch, key=account.key.hex(), log=log, env=env)
    return ProviderProcess(account, span, node, market.contracts.protocol_domain())


def wait_ready(provider: ProviderProcess, timeout_s: float = 300) -> None:
    provider.node.wait_ready(timeout_s)


def stop_providers(providers: list[ProviderProcess]) -> None:
    for provider in providers:
        provider.node.stop()


def tiny_model(root: Path, name: str = "tiny", seed: int = 3) -> Path:
    model = write_tiny_checkpoint(root / name, arch="llama", layers=6, hidden=128, seed=seed)
    load_model(model)  # writes the manifest once, before several processes would race to
    return model


@contextmanager
def database(backend: str, tmp: Path, *, template: str | None = None) -> Iterator[str]:
    """A fresh database URL on ``backend``: empty, or a copy of the database at ``template`` (a migrated one, say,
    which is far quicker to copy than to migrate). PostgreSQL skips the test if no server answers."""
    if backend == "sqlite":
        path = tmp / f"gateway-{uuid.uuid4().hex[:8]}.db"
        if template is not None:
            shutil.copyfile(template.removeprefix("sqlite:///"), path)
        yield f"sqlite:///{path}"
        return
    name = f"strata_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN_URL}: {exc}")
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    copy = f' TEMPLATE "{template.rsplit("/", 1)[1]}"' if template is not None else ""
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"{copy}')
        try:
            yield f"{base}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def gateway_settings(
    market: Market, database_url: str, models: dict[str, Path], **overrides: object
) -> GatewaySettings:
    settings: dict[str, object] = {
        "rpc_url": market.anvil.url,
        "deployment_file": market.deployment_file,
        "database_url": database_url,
        "gateway_key": market.gateway_key.key.hex(),
        "models": [f"{name}={path}" for name, path in models.items()],
        "chain_poll_s": 0.2,
        "job_sweep_s": 0.2,
        "step_timeout_s": 20,
        "heartbeat_ttl_s": 3600,
        "max_job_ttl_s": 1_800,  # with the default window and epoch: within WITHDRAW_DELAY_S
        # Every test client is 127.0.0.1: limits per client address are tested with clients of their own.
        "rate_limit_ip_per_s": 0,
    }
    return GatewaySettings(**{**settings, **overrides}, _env_file=None)  # type: ignore[arg-type]


def announce(
    url: str, provider: ProviderProcess, root: str, *, price: int = PRICE, capacity: int = 8
) -> Announcer:
    """Posts a provider's ask and one heartbeat to the gateway at ``url``, as `provider serve --gateway` would.

    The announcer comes back with its HTTP client closed; `signed_ask` still works, and `withdraw` below
    opens a client of its own."""
    announcer = Announcer(
        url,
        provider.account,
        Offer(
            root,
            provider.span[0],
            provider.span[1],
            price,
            capacity,
            provider.endpoint,
            provider.fingerprint,
            DEFAULT_RETENTION_S,
        ),
        domain=provider.domain,
        trusted=None,
        heartbeat_s=2.0,
    )

    async def post() -> None:
        await announcer.post_ask()
        try:
            await announcer.heartbeat()
        except AnnounceError as exc:
            if exc.code != "stale_heartbeat":  # a newer heartbeat is in: the provider is alive already
                raise

    _with_client(announcer, post)
    return announcer


def withdraw(announcer: Announcer) -> None:
    _with_client(announcer, announcer.withdraw)


def _with_client(announcer: Announcer, action: Callable[[], Awaitable[None]]) -> None:
    """Runs ``action`` on a client bound to a loop of its own, and closes both."""

    async def run() -> None:
        announcer.client = httpx.AsyncClient(timeout=10.0)
        try:
            await action()
        finally:
            await announcer.aclose()

    asyncio.run(run())


def open_channel(market: Market, client: LocalAccount, amount: int) -> bytes:
    channel = random_channel_id(client.address)
    asyncio.run(fund_channel(market.contracts, client, channel, amount))
    return channel


def wallet_for(market: Market, client: LocalAccount, channel: bytes, **options: object) -> ChannelWallet:
    return ChannelWallet(
        client,
        channel,
        escrow=market.contracts.escrow.address,
        chain_id=31337,
        deposit=market.contracts.escrow.channel(channel).deposit,
        **options,  # type: ignore[arg-type]
    )


def strata_client(url: str, wallet: ChannelWallet) -> StrataClient:
    return StrataClient(url, wallet)


# -- raw HTTP, for crafting payments by hand ---------------------------------------------------------------


def post(url: str, path: str, body: dict[str, Any], payment: str | None = None) -> httpx.Response:
    headers = {PAYMENT_SIGNATURE: payment} if payment is not None else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=120)


def chat_body(content: str = "hello", max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}  # fmt: skip


def requirement(response: httpx.Response, scheme: str) -> dict[str, Any]:
    assert response.status_code == 402, response.text
    required = decode_header(response.headers[PAYMENT_REQUIRED])
    return next(r for r in required["accepts"] if r["scheme"] == scheme)


def voucher_header(
    account: LocalAccount,
    channel: bytes,
    amount: int,
    accepted: dict[str, Any],
    *,
    domain: Domain | None = None,
) -> str:
    domain = domain or voucher_domain(31337, accepted["payTo"])
    signature = Voucher(channel, amount).sign(account, domain)
    payload = {
        "channelId": "0x" + channel.hex(),
        "maxClaimableAmount": str(amount),
        "signature": "0x" + signature.hex(),
    }
    return encode_header({"x402Version": 2, "accepted": accepted, "payload": payload})


def exact_header(
    account: LocalAccount,
    accepted: dict[str, Any],
    token_domain: Domain,
    *,
    value: int | None = None,
    to: str | None = None,
    valid_after: int = 0,
    valid_before: int | None = None,
    nonce: bytes | None = None,
    signer: LocalAccount | None = None,
) -> str:
    authorization = TransferAuthorization(
        account.address,
        to or accepted["payTo"],
        int(accepted["amount"]) if value is None else value,
        valid_after,
        int(time.time()) + 300 if valid_before is None else valid_before,
        nonce or os.urandom(32),
    )
    signature = authorization.sign(signer or account, token_domain)
    payload = {
        "authorization": {
            "from": authorization.sender,
            "to": authorization.recipient,
            "value": str(authorization.value),
            "validAfter": str(authorization.valid_after),
            "validBefore": str(authorization.valid_before),
            "nonce": "0x" + authorization.nonce.hex(),
        },
        "signature": "0x" + signature.hex(),
    }
    return encode_header({"x402Version": 2, "accepted": accepted, "payload": payload})


def channel_state(url: str, channel: bytes) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/channels/0x{channel.hex()}", timeout=30)
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()
    return state


def settled(response: httpx.Response) -> dict[str, Any]:
    return decode_header(response.headers[PAYMENT_RESPONSE])


def rows(server: GatewayServer, statement: Any) -> list[Any]:
    """Reads the gateway's database from the test's thread, with a connection of its own."""
    engine = create_engine(sync_url(server.gateway.settings.database_url))
    try:
        with engine.connect() as connection:
            return list(connection.execute(statement))
    finally:
        engine.dispose()


def wait_until(check: Any, timeout_s: float = 30.0, every_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(every_s)


class RpcProxy(ThreadingHTTPServer):
    """A JSON-RPC proxy in front of anvil that misbehaves on demand, as public endpoints do: while ``down`` every
    connection is closed unanswered; each entry of ``faults`` spoils one answer ("429": HTTP 429 Too Many
    Requests, "rpc_error": a JSON-RPC error object); and an ``eth_getLogs`` over more than ``max_log_blocks``
    blocks is refused with a JSON-RPC error, as endpoints cap log ranges."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.down = upstream, False
        self.faults: list[str] = []
        self.max_log_blocks: int | None = None
        self.refused_log_ranges = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                if self.down:
                    handler.close_connection = True
                    return
                spoiled = self._spoiled(json.loads(body))
                if spoiled is not None:
                    status, content = spoiled
                else:
                    answer = httpx.post(
                        self.upstream, content=body, headers={"Content-Type": "application/json"}
                    )
                    status, content = answer.status_code, answer.content
                handler.send_response(status)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(content)))
                handler.end_headers()
                handler.wfile.write(content)

            def log_message(handler, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def _spoiled(self, request: Any) -> tuple[int, bytes] | None:
        if isinstance(request, list):
            return None
        ident = request.get("id")
        if self.faults:
            fault = self.faults.pop(0)
            if fault == "429":
                return 429, b'{"error": "too many requests"}'
            error = {"code": -32000, "message": "internal error, try again"}
            return 200, json.dumps({"jsonrpc": "2.0", "id": ident, "error": error}).encode()
        if request.get("method") == "eth_getLogs" and self.max_log_blocks is not None:
            query = request["params"][0]
            first, last = int(query["fromBlock"], 16), int(query["toBlock"], 16)
            if last - first + 1 > self.max_log_blocks:
                self.refused_log_ranges += 1
                error = {"code": -32005, "message": f"query exceeds max block range {self.max_log_blocks}"}
                return 200, json.dumps({"jsonrpc": "2.0", "id": ident, "error": error}).encode()
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
