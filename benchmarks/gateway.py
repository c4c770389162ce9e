"""Gateway cost: what paying adds to a request, and how long route planning takes on a big book.

Paid overhead: one anvil with the contracts, three `strata provider serve` processes over a tiny model, and
two `strata gateway serve` processes on their own SQLite files, identical but for PAYMENTS_ENABLED. The same
greedy chat request goes to both, alternating which goes first, over kept-alive connections. Vouchers are
signed before timing starts (signing is the client's cost, not the gateway's); each is cumulative, one quote
above the last, so every one is fresh and covers its request.

    paid_overhead_ms_p50  median over pairs of (paid request − the same request with payment checks off), ms
                          (target ≤ 3)
    x402_batch_overhead_ms_p50
                          the same for a request paid by x402's own batch-settlement client (its scheme signs
                          each voucher, untimed, from what the previous answer told it; the channel's deposit
                          was made by its first payment, before timing)
    route_ms_80x1000      planning one route through an 80-layer model with 1,000 live asks, median ms
                          (target ≤ 5)

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount
from transformers.utils import logging as hf_logging
from web3.types import RPCEndpoint
from x402 import x402ClientSync
from x402.http import x402HTTPClientSync
from x402.mechanisms.evm.batch_settlement.client.config import (
    BatchSettlementDepositPolicy,
    BatchSettlementEvmSchemeOptions,
)
from x402.mechanisms.evm.batch_settlement.client.scheme import BatchSettlementEvmScheme
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC

from marketplace.client import fund_channel
from marketplace.devnet.anvil import Anvil
from marketplace.devnet.process import free_port
from marketplace.devnet.providers import ProviderLaunch, ProviderProcess
from marketplace.gateway.catalog import load_model
from marketplace.gateway.orderbook import BookAsk, OrderBook
from marketplace.gateway.payments.x402 import (
    PAYMENT_REQUIRED,
    PAYMENT_SIGNATURE,
    decode_header,
    encode_header,
)
from marketplace.provider.announce import DEFAULT_RETENTION_S, Announcer, Offer
from marketplace.provider.staking import bond
from settlement.chain import Chain
from settlement.contracts import random_channel_id
from settlement.deploy import ONE_TOKEN, Contracts, DeployParams, deploy
from settlement.eip712 import Domain, Voucher, voucher_domain
from worker.testing.tiny import write_tiny_checkpoint

STRATA = str(Path(sys.executable).with_name("strata"))
GATEWAY_KEY = Account.from_key(b"\x42" * 32)
SPANS = ((0, 2), (2, 4), (4, 6))
PRICE = 1_000_000
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "How much does this cost?"}],
        "max_tokens": 4, "temperature": 0}  # fmt: skip
# Processes share two cores: OpenMP threads that spin after a step would steal the next process's core.
QUIET_THREADS = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def route_planning_ms(rounds: int = 200, layers: int = 80, asks: int = 1_000) -> float:
    """Median ms of OrderBook.route over a book of ``asks`` random spans of an ``layers``-layer model."""
    rng = random.Random(7)
    book = OrderBook(heartbeat_ttl_s=3600)
    now = time.time()
    for i in range(asks):
        start = rng.randrange(layers)
        end = min(layers, start + rng.randint(1, 16))
        provider = f"0x{i:040x}"
        book.post(
            BookAsk(
                i,
                provider,
                "m",
                start,
                end,
                rng.randint(1, 100),
                4,
                f"10.0.0.1:{i + 1}",
                bytes(32),
                now + 3600,
            )
        )
        book.set_active(provider, True)
        book.heartbeat(provider, now)
    for start in range(0, layers, 8):  # a route always exists, whatever the random spans left uncovered
        provider = f"0x{asks + start:040x}"
        book.post(
            BookAsk(
                asks + start, provider, "m", start, start + 8, 1_000, 4, "10.0.0.2:1", bytes(32), now + 3600
            )
        )
        book.set_active(provider, True)
        book.heartbeat(provider, now)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        route = book.route("m", layers)
        times.append((time.perf_counter() - started) * 1e3)
        assert route is not None
    return statistics.median(times)


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # Output goes to a file: a pipe nobody reads would fill up and stall the process mid-benchmark.
    with log.open("wb") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=log.parent
        )


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway at {url} exited:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the gateway at {url} did not start")


@contextlib.contextmanager
def marketplace(
    workdir: Path,
) -> Iterator[tuple[Anvil, list[str], LocalAccount, bytes, Contracts, LocalAccount]]:
    """Anvil, providers and two gateways; yields (anvil, [paid url, free url], client, channel, contracts, batch
    payer): the client pays from a funded VoucherEscrow channel, the batch payer with x402's client."""
    processes: list[subprocess.Popen[bytes]] = []
    nodes: list[ProviderProcess] = []
    anvil = Anvil(accounts=9).start()
    try:
        accounts = anvil.accounts
        chain = Chain(anvil.url, receipt_timeout_s=30)
        contracts = deploy(
            chain, accounts[0], operator=accounts[1].address, treasury=accounts[2].address,
            slasher=accounts[3].address, params=DeployParams(min_stake=100 * ONE_TOKEN),
        )  # fmt: skip
        providers, client, batch_payer = accounts[4:7], accounts[7], accounts[8]
        for account in [*providers, client, batch_payer]:
            contracts.token.mint(accounts[0], to=account.address, amount=10_000 * ONE_TOKEN)
        for provider in providers:
            bond(contracts, provider, 100 * ONE_TOKEN)
        # The gateway sends x402 batch-settlement deposits, so it pays gas.
        chain.w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [GATEWAY_KEY.address, hex(10**21)])
        channel = random_channel_id(client.address)
        asyncio.run(fund_channel(contracts, client, channel, 1_000 * ONE_TOKEN))
        deployment_file = workdir / "deployment.json"
        contracts.deployment.save(deployment_file)

        model = write_tiny_checkpoint(workdir / "tiny", arch="llama", layers=6, hidden=128, seed=3)
        root = load_model(model).root
        nodes = [
            ProviderProcess.start(
                ProviderLaunch(
                    model,
                    f"{first}:{last}",
                    free_port(),
                    trust_gateway=GATEWAY_KEY.address,
                    deployment=deployment_file,
                    tls_dir=workdir / f"tls-{index}",
                    retained_dir=workdir / f"retained-{index}",
                ),
                key=provider.key.hex(),
                log=workdir / f"provider-{index}.log",
                env={**os.environ, **QUIET_THREADS},
            )
            for index, (provider, (first, last)) in enumerate(zip(providers, SPANS, strict=True))
        ]
        urls = []
        for paid in (True, False):
            port = free_port()
            urls.append(f"http://127.0.0.1:{port}")
            env = {
                "RPC_URL": anvil.url, "DEPLOYMENT_FILE": str(deployment_file),
                "DATABASE_URL": f"sqlite:///{workdir / f'gateway-{port}.db'}", "GATEWAY_KEY": GATEWAY_KEY.key.hex(),
                "MODELS": json.dumps([f"tiny={model}"]), "PAYMENTS_ENABLED": str(paid).lower(),
                "HEARTBEAT_TTL_S": "3600", **QUIET_THREADS,
            }  # fmt: skip
            command = [STRATA, "gateway", "serve", "--port", str(port)]
            processes.append(start(command, env, workdir / f"gateway-{port}.log"))
        for node in nodes:
            node.wait_ready()
        for url, process in zip(urls, processes, strict=True):
            wait_healthy(url, process, workdir / f"gateway-{url.rsplit(':', 1)[1]}.log")
            for provider, (first, last), node in zip(providers, SPANS, nodes, strict=True):
                offer = Offer(
                    root, first, last, PRICE, 8, node.endpoint, node.fingerprint, DEFAULT_RETENTION_S
                )
                asyncio.run(announce(url, provider, offer, contracts.protocol_domain()))
        yield anvil, urls, client, channel, contracts, batch_payer
    finally:
        for node in nodes:
            node.stop()
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        anvil.stop()


async def announce(url: str, provider: LocalAccount, offer: Offer, domain: Domain) -> None:
    announcer = Announcer(url, provider, offer, domain=domain, trusted=[GATEWAY_KEY.address])
    try:
        await announcer.post_ask()
        await announcer.heartbeat()
    finally:
        await announcer.aclose()


def vouchers(client: LocalAccount, channel: bytes, offer: dict[str, object], count: int) -> list[str]:
    quote = int(str(offer["amount"]))
    domain = voucher_domain(31337, str(offer["payTo"]))
    headers = []
    for i in range(1, count + 1):
        amount = i * quote  # at least everything charged so far plus this request's quote
        signature = Voucher(channel, amount).sign(client, domain)
        payload = {"channelId": "0x" + channel.hex(), "maxClaimableAmount": str(amount),
                   "signature": "0x" + signature.hex()}  # fmt: skip
        headers.append(encode_header({"x402Version": 2, "accepted": offer, "payload": payload}))
    return headers


class BatchPayer:
    """x402's batch-settlement client, its payloads made and its answers read by its own code, with only the
    request in between timed."""

    def __init__(self, account: LocalAccount, rpc_url: str, token: str) -> None:
        self.scheme = BatchSettlementEvmScheme(
            EthAccountSignerWithRPC(account, rpc_url),
            BatchSettlementEvmSchemeOptions(
                deposit_policy=BatchSettlementDepositPolicy(deposit_multiplier=2_000)
            ),
        )
        self.client = x402ClientSync()
        self.client.register("eip155:31337", self.scheme)
        self.client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": token}]})
        self.http = x402HTTPClientSync(self.client)
        self.required: Any = None

    def header(self, quote_response: httpx.Response | None = None) -> tuple[Any, dict[str, str]]:
        if quote_response is not None:
            self.required = self.http.get_payment_required_response(quote_response.headers.get, None)
        payload = self.client.create_payment_payload(self.required)
        return payload, self.http.encode_payment_signature_header(payload)

    def answered(self, payload: Any, response: httpx.Response) -> None:
        self.http.process_payment_result(payload, response.headers.get, response.status_code)


def paid_overhead(pairs: int, warmup: int, workdir: Path) -> dict[str, float]:
    with marketplace(workdir) as (anvil, (paid_url, free_url), client, channel, contracts, batch_payer):
        chat = "/v1/chat/completions"
        with (
            httpx.Client(base_url=paid_url, timeout=60) as paid,
            httpx.Client(base_url=free_url, timeout=60) as free,
        ):
            required = paid.post(chat, json=BODY)
            assert required.status_code == 402, required.text
            offer = next(o for o in decode_header(required.headers[PAYMENT_REQUIRED])["accepts"]
                         if o["scheme"] == "voucher")  # fmt: skip
            headers = iter(vouchers(client, channel, offer, warmup + pairs))
            batch = BatchPayer(batch_payer, anvil.url, contracts.token.address)
            payload, opening = batch.header(required)
            opened = paid.post(chat, json=BODY, headers=opening)  # the deposit, untimed
            assert opened.status_code == 200, opened.text
            batch.answered(payload, opened)

            def timed_batch() -> float:
                payload, header = batch.header()
                started = time.perf_counter()
                response = paid.post(chat, json=BODY, headers=header)
                elapsed = (time.perf_counter() - started) * 1e3
                if response.status_code != 200:
                    raise RuntimeError(f"a batch-settlement request failed: {response.text}")
                batch.answered(payload, response)
                return elapsed

            def timed_paid() -> float:
                started = time.perf_counter()
                response = paid.post(chat, json=BODY, headers={PAYMENT_SIGNATURE: next(headers)})
                elapsed = (time.perf_counter() - started) * 1e3
                if response.status_code != 200:
                    raise RuntimeError(f"a paid request failed: {response.text}")
                return elapsed

            def timed_free() -> float:
                started = time.perf_counter()
                response = free.post(chat, json=BODY)
                elapsed = (time.perf_counter() - started) * 1e3
                if response.status_code != 200:
                    raise RuntimeError(f"an unpaid request failed: {response.text}")
                return elapsed

            for _ in range(warmup):
                timed_paid()
                timed_batch()
                timed_free()
            paid_ms: list[float] = []
            batch_ms: list[float] = []
            free_ms: list[float] = []
            orders = [(paid_ms, timed_paid), (batch_ms, timed_batch), (free_ms, timed_free)]
            for i in range(pairs):
                for times, timed in orders[i % 3 :] + orders[: i % 3]:  # each goes first as often
                    times.append(timed())
            channel_state = paid.get(f"/v1/channels/0x{channel.hex()}").json()
    differences = [p - f for p, f in zip(paid_ms, free_ms, strict=True)]
    batch_differences = [b - f for b, f in zip(batch_ms, free_ms, strict=True)]
    return {
        "paid_ms_p50": statistics.median(paid_ms),
        "batch_ms_p50": statistics.median(batch_ms),
        "unpaid_ms_p50": statistics.median(free_ms),
        "paid_overhead_ms_p50": statistics.median(differences),
        "paid_overhead_ms_p90": statistics.quantiles(differences, n=10)[-1],
        "x402_batch_overhead_ms_p50": statistics.median(batch_differences),
        "charged_total": int(channel_state["charged"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    route_ms = route_planning_ms()
    print(f"route planning, 80 layers × 1,000 asks: {route_ms:.3f} ms (median)")
    with tempfile.TemporaryDirectory() as workdir:
        overhead = paid_overhead(args.pairs, args.warmup, Path(workdir))
    print(
        f"chat, 4 tokens, {args.pairs} pairs: paid {overhead['paid_ms_p50']:.2f} ms, "
        f"unpaid {overhead['unpaid_ms_p50']:.2f} ms (medians)"
    )
    result = {
        "paid_overhead_ms_p50": round(overhead["paid_overhead_ms_p50"], 3),
        "x402_batch_overhead_ms_p50": round(overhead["x402_batch_overhead_ms_p50"], 3),
        "batch_ms_p50": round(overhead["batch_ms_p50"], 2),
        "paid_overhead_ms_p90": round(overhead["paid_overhead_ms_p90"], 3),
        "paid_ms_p50": round(overhead["paid_ms_p50"], 2),
        "unpaid_ms_p50": round(overhead["unpaid_ms_p50"], 2),
        "route_ms_80x1000": round(route_ms, 3),
        "pairs": args.pairs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
