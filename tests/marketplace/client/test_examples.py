"""examples/pay_with_sdk.py, run as the README runs it: a separate process given only the environment the README
exports, against a live gateway with providers in its book and a channel funded on chain."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from settlement.config import PROJECT_ROOT
from settlement.deploy import ONE_TOKEN
from tests.marketplace.harness import GatewayServer, Market, channel_state, open_channel

EXAMPLE = PROJECT_ROOT / "examples" / "pay_with_sdk.py"
# Settings a developer's shell may hold: the example must run on what the test gives it.
SETTINGS = ("CLIENT_KEY", "CHANNEL_ID", "GATEWAY_URL", "DEPLOYMENT_FILE", "RPC_URL", "MODEL")

# The example does not depend on the gateway's database: one backend is enough.
on_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@on_sqlite
def test_the_sdk_example_pays_for_an_answer_and_a_stream_from_the_channel(
    gateway: GatewayServer, market: Market
) -> None:
    client = market.clients[2]
    channel = open_channel(market, client, 5 * ONE_TOKEN)
    env = {name: value for name, value in os.environ.items() if name not in SETTINGS}
    env.update(
        CLIENT_KEY=client.key.to_0x_hex(),
        CHANNEL_ID="0x" + channel.hex(),
        GATEWAY_URL=gateway.url,
        DEPLOYMENT_FILE=str(market.deployment_file),
    )
    run = subprocess.run(
        [sys.executable, str(EXAMPLE)], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # The tiny model's text is any bytes, newlines included: only the example's own words are looked for.
    assert run.stdout.startswith("SDK: ") and "\nOpenAI's client, streamed: " in run.stdout
    # Both answers were paid from the channel, and the wallet followed every charge, the stream's too.
    state = channel_state(gateway.url, channel)
    assert int(state["charged"]) > 0 and state["reserved"] == "0"
    last = run.stdout.rstrip("\n").rsplit("\n", 1)[-1]
    assert last == f"channel 0x{channel.hex()}: {state['charged']} base units charged in all"


def test_the_sdk_example_says_what_it_needs_when_it_is_not_given() -> None:
    env = {name: value for name, value in os.environ.items() if name not in SETTINGS}
    run = subprocess.run(
        [sys.executable, str(EXAMPLE)], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    assert "set CLIENT_KEY and CHANNEL_ID first" in run.stderr
