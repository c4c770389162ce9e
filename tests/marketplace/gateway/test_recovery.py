"""The gateway process killed with SIGKILL while it streams a paid answer and while a paid job rests in the
book: after a restart on the same database nothing the client reserved stays locked, the interrupted job is
charged nothing, and the resting job is still there and runs once a route fits its price."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from marketplace.devnet.process import free_port
from settlement.deploy import ONE_TOKEN
from tests.marketplace.harness import (
    PRICE,
    STRATA,
    Market,
    ProviderProcess,
    announce,
    channel_state,
    chat_body,
    database,
    open_channel,
    post,
    requirement,
    voucher_header,
    wait_until,
)

CHAT = "/v1/chat/completions"


class GatewayProcess:
    """`strata gateway serve` as an operator runs it, configured by the environment alone."""

    def __init__(self, market: Market, database_url: str, model_dir: Path, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.env = {
            **os.environ,
            "RPC_URL": market.anvil.url,
            "DEPLOYMENT_FILE": str(market.deployment_file),
            "DATABASE_URL": database_url,
            "GATEWAY_KEY": market.gateway_key.key.hex(),
            "MODELS": json.dumps([f"tiny={model_dir}"]),
            "HEARTBEAT_TTL_S": "3600",
            "CHAIN_POLL_S": "0.2",
            "JOB_SWEEP_S": "0.2",
            "MAX_JOB_TTL_S": "1800",  # within the test deployment's withdraw delay, or the gateway will not start
            "OMP_NUM_THREADS": "1",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        self.process = subprocess.Popen(
            [STRATA, "gateway", "serve", "--port", str(self.port)],
            cwd=self.workdir, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        process = self.process

        def healthy() -> bool:
            assert process.poll() is None, "the gateway exited"
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.url + "/health", timeout=2).status_code == 200
            return False

        wait_until(healthy, timeout_s=120, every_s=0.2)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def gateway_process(
    backend: str, market: Market, model_dir: Path, providers: dict[str, ProviderProcess], tmp_path: Path
) -> Iterator[GatewayProcess]:
    with database(backend, tmp_path) as url:
        process = GatewayProcess(market, url, model_dir, tmp_path)
        try:
            yield process
        finally:
            process.stop()


def job(url: str, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
    return found


def test_a_gateway_killed_mid_answer_releases_what_it_held_and_keeps_resting_jobs(
    gateway_process: GatewayProcess, market: Market, model_dir: Path, providers: dict[str, ProviderProcess]
) -> None:
    gateway = gateway_process.start()
    root = httpx.get(gateway.url + "/v1/models/tiny").json()["root"]
    for name in ("a", "b", "c"):
        announce(gateway.url, providers[name], root)
    client = market.clients[0]
    channel = open_channel(market, client, 10 * ONE_TOKEN)

    # A job that rests: it will pay at most half of today's price for it.
    resting_body = {"model": "tiny", "prompt": "wait for it", "max_tokens": 4, "ttl_s": 600}
    today = int(requirement(post(gateway.url, "/v1/jobs", resting_body), "voucher")["amount"])
    resting_body["max_price"] = max_price = today // 2
    offer = requirement(post(gateway.url, "/v1/jobs", resting_body), "voucher")
    response = post(gateway.url, "/v1/jobs", resting_body, voucher_header(client, channel, max_price, offer))
    assert response.status_code == 202, response.text
    resting_id = response.json()["id"]

    chat = chat_body("interrupted", max_tokens=1500)
    offer = requirement(post(gateway.url, CHAT, chat), "voucher")
    quote = int(offer["amount"])
    header = voucher_header(client, channel, max_price + quote, offer)
    first: dict[str, Any] = {}
    with (
        contextlib.suppress(httpx.HTTPError),  # the stream breaks when the gateway dies
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST", gateway.url + CHAT, json={**chat, "stream": True}, headers={"PAYMENT-SIGNATURE": header}
        ) as streamed,
    ):
        assert streamed.status_code == 200
        # Held: a dropped iterator would close the stream, and a closed stream cancels the job.
        lines = streamed.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
        state = channel_state(gateway.url, channel)
        running = job(gateway.url, "0x" + first["id"].removeprefix("chatcmpl-"))
        assert state["reserved"] == str(max_price + quote), json.dumps(running)  # both held while it streams
        gateway.kill()
    interrupted_id = "0x" + first["id"].removeprefix("chatcmpl-")

    gateway.start()
    interrupted = job(gateway.url, interrupted_id)
    assert interrupted["status"] == "failed" and interrupted["error"]["code"] == "gateway_restarted"
    assert interrupted["charged"] == "0"
    assert job(gateway.url, resting_id)["status"] == "resting"
    state = channel_state(gateway.url, channel)
    assert (state["charged"], state["reserved"]) == ("0", str(max_price))

    # The book came back from the database; a quarter of the price brings the resting job a route.
    for name in ("a", "b", "c"):
        announce(gateway.url, providers[name], root, price=PRICE // 4)
    settled = ("completed", "failed", "expired", "cancelled")
    done = wait_until(lambda: (j := job(gateway.url, resting_id))["status"] in settled and j, timeout_s=120)
    assert done["status"] == "completed", done
    assert 0 < int(done["charged"]) <= max_price
    state = channel_state(gateway.url, channel)
    assert (state["charged"], state["reserved"]) == (done["charged"], "0")
    # The interrupted request's voucher was never spent: a new request may still use its amount.
    assert state["voucherAmount"] == str(max_price + quote)
