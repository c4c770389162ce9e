"""`strata client` against the real marketplace: deposit, ask, balance and withdraw on anvil through the gateway,
and every way its arguments or settings can be wrong.

Each test pays from a fresh account and keeps its channel file in its own directory, so balances are exact and
nothing depends on what other tests did with the shared client accounts.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import Result
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import select
from typer.testing import CliRunner

from marketplace.cli import app
from marketplace.devnet.process import free_port
from marketplace.gateway.payments.x402 import PAYMENT_REQUIRED, decode_header
from settlement.contracts import Redemption
from settlement.db.schema import Channel
from settlement.deploy import ONE_TOKEN
from tests.marketplace.cli.keyfile import key_file
from tests.marketplace.harness import (
    WITHDRAW_DELAY_S,
    GatewayServer,
    Market,
    chain_clock_moved,
    channel_state,
    rows,
    wait_until,
)

# The CLI does not depend on the gateway's database: one backend is enough.
on_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

FUNDED = 20 * ONE_TOKEN
CLOSED = 2**256 - 1
SETTINGS = ("CLIENT_KEY", "GATEWAY_URL", "CHANNEL_FILE", "RPC_URL", "DEPLOYMENT_FILE")

runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env, and the default .strata/ lands in the test's own directory
    channel_file = tmp_path / "channels.json"
    monkeypatch.setenv("CHANNEL_FILE", str(channel_file))
    return channel_file


@pytest.fixture
def connected(market: Market, gateway: GatewayServer, monkeypatch: pytest.MonkeyPatch) -> GatewayServer:
    monkeypatch.setenv("RPC_URL", market.anvil.url)
    monkeypatch.setenv("DEPLOYMENT_FILE", str(market.deployment_file))
    monkeypatch.setenv("GATEWAY_URL", gateway.url)
    return gateway


@pytest.fixture
def payer(market: Market) -> LocalAccount:
    account: LocalAccount = Account.create()
    market.contracts.token.mint(market.admin, to=account.address, amount=FUNDED)
    # Gas for approve, deposit and the withdrawal's two transactions.
    market.contracts.chain.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**20)])  # type: ignore[arg-type]
    return account


def strata(*args: str, key: LocalAccount | None = None) -> Result:
    extra = ["--key-file", key_file(key)] if key is not None else []
    return runner.invoke(app, ["client", *args, *extra])


def printed(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def error_code(result: Result) -> str:
    assert result.exit_code == 1, result.output
    return str(json.loads(result.stdout)["error"]["code"])


def flowing(text: str) -> str:
    """Text as one line: Rich wraps long lines and draws panels around usage errors."""
    return " ".join(text.replace("│", " ").split())


def shown(units: int) -> str:
    return f"{Decimal(units) / ONE_TOKEN:,.6f}"


def saved_channel(channel_file: Path) -> bytes:
    (channel,) = json.loads(channel_file.read_text()).values()
    return bytes.fromhex(channel[2:])


@on_sqlite
def test_deposit_ask_balance_and_withdraw(
    connected: GatewayServer, market: Market, payer: LocalAccount, clean_environment: Path
) -> None:
    token, escrow = market.contracts.token, market.contracts.escrow

    deposited = strata("deposit", "5", key=payer)
    assert deposited.exit_code == 0, deposited.output
    channel = saved_channel(clean_environment)
    assert f"Channel 0x{channel.hex()} now holds 5.000000 tokens." in flowing(deposited.stdout)
    assert escrow.channel(channel).deposit == 5 * ONE_TOKEN
    assert token.balance_of(payer.address) == FUNDED - 5 * ONE_TOKEN

    # A second deposit goes to the remembered channel, not a new one.
    more = printed(strata("deposit", "0.5", "--json", key=payer))
    total = 5 * ONE_TOKEN + ONE_TOKEN // 2
    assert more == {
        "channelId": "0x" + channel.hex(),
        "deposited": str(ONE_TOKEN // 2),
        "deposit": str(total),
    }
    assert escrow.channel(channel).deposit == total

    asked = strata("ask", "hello there", "--model", "tiny", "--max-tokens", "6", key=payer)
    assert asked.exit_code == 0, asked.output
    assert asked.stdout.strip()
    state = channel_state(connected.url, channel)
    charged = int(state["charged"])
    assert charged > 0 and state["reserved"] == "0"
    # The wallet learns the cost from the stream's last chunk; it reports the gateway's own figure.
    assert f"channel total charged: {shown(charged)} tokens" in asked.stderr

    answer = printed(strata("ask", "and again", "--model", "tiny", "--max-tokens", "4", "--json", key=payer))
    assert answer["object"] == "chat.completion"
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    state = channel_state(connected.url, channel)
    assert int(state["charged"]) > charged
    charged = int(state["charged"])

    balance = printed(strata("balance", "--json", key=payer))
    assert balance["account"] == payer.address
    assert balance["balance"] == str(FUNDED - total) == str(token.balance_of(payer.address))
    assert balance["channel"] == state
    assert balance["channel"]["deposit"] == str(total)
    assert int(balance["channel"]["available"]) == total - charged

    table = flowing(strata("balance", key=payer).stdout)
    assert f"Channel 0x{channel.hex()}" in table
    assert f"wallet balance {shown(FUNDED - total)}" in table
    assert f"channel charged {shown(charged)}" in table

    exiting = printed(strata("withdraw", "--json", key=payer))
    assert exiting["channelId"] == "0x" + channel.hex() and exiting["status"] == "exiting"
    assert int(exiting["withdrawableAt"]) == escrow.channel(channel).withdrawable_at
    wait_until(lambda: channel_state(connected.url, channel)["exiting"])
    assert error_code(strata("ask", "too late", "--model", "tiny", "--json", key=payer)) == "channel_exiting"

    # Settlement redeems the gateway's newest voucher for what was charged while the exit is pending; what is
    # left of the deposit is the payer's.
    (row,) = rows(connected, select(Channel).where(Channel.id == "0x" + channel.hex()))
    assert row.charged == charged
    voucher = Redemption(channel, row.voucher_amount, charged, bytes.fromhex(row.voucher_signature[2:]))
    escrow.redeem(market.operator, [voucher])

    # The delay passes: the payer takes back what was never charged.
    with chain_clock_moved(market, WITHDRAW_DELAY_S):
        closed = printed(strata("withdraw", "--json", key=payer))
        assert closed == {
            "channelId": "0x" + channel.hex(),
            "status": "closed",
            "withdrawn": str(total - charged),
        }
        assert token.balance_of(payer.address) == FUNDED - charged
        assert escrow.channel(channel).withdrawable_at == CLOSED
        assert error_code(strata("withdraw", "--json", key=payer)) == "channel_closed"

        # A closed channel takes no deposits: the next one opens a fresh channel, found from CLIENT_KEY this time.
        with pytest.MonkeyPatch.context() as env:
            env.setenv("CLIENT_KEY", payer.key.to_0x_hex())
            reopened = printed(strata("deposit", "1", "--json"))
        assert reopened["channelId"] != "0x" + channel.hex() and reopened["deposit"] == str(ONE_TOKEN)
        assert saved_channel(clean_environment).hex() == reopened["channelId"][2:]
        assert token.balance_of(payer.address) == FUNDED - charged - ONE_TOKEN


@on_sqlite
def test_ask_without_a_channel_fails_and_moves_no_money(
    connected: GatewayServer, market: Market, payer: LocalAccount, clean_environment: Path
) -> None:
    clean_environment.write_text("{}\n")
    result = strata("ask", "hello", "--model", "tiny", key=payer)
    assert result.exit_code == 1
    assert "(no_channel)" in result.stderr and "strata client deposit" in flowing(result.stderr)
    assert error_code(strata("ask", "hello", "--model", "tiny", "--json", key=payer)) == "no_channel"
    assert error_code(strata("withdraw", "--json", key=payer)) == "no_channel"
    assert printed(strata("balance", "--json", key=payer))["channel"] is None
    assert market.contracts.token.balance_of(payer.address) == FUNDED
    assert clean_environment.read_text() == "{}\n"


@on_sqlite
def test_unreachable_gateway_fails_with_a_code(
    connected: GatewayServer, market: Market, payer: LocalAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    deposit = printed(strata("deposit", "1", "--json", key=payer))
    monkeypatch.setenv("GATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    assert error_code(strata("ask", "hello", "--model", "tiny", "--json", key=payer)) == "gateway_unavailable"
    # The chain still answers, so balance reports what it can and says what it could not.
    balance = printed(strata("balance", "--json", key=payer))
    assert balance["channel"]["channelId"] == deposit["channelId"]
    assert balance["channel"]["deposit"] == str(ONE_TOKEN)
    assert balance["channel"]["gateway"].startswith("unreachable")
    assert market.contracts.token.balance_of(payer.address) == FUNDED - ONE_TOKEN


@pytest.mark.parametrize(
    "args, message",
    [
        (["deposit", "five"], "'five' is not an amount"),
        (["deposit", "--", "-1"], "'-1' must be positive with at most 6 decimals"),
        (["deposit", "0"], "'0' must be positive"),
        (["deposit", "1.0000001"], "'1.0000001' must be positive with at most 6 decimals"),
        (["deposit", "NaN"], "'NaN' must be positive"),
        (["deposit", "sNaN"], "'sNaN' must be positive"),
        (["deposit", "1e999999999"], "'1e999999999' must be positive"),
        # More digits than Decimal's default context holds: rounding would deposit another amount.
        (["deposit", "1234567890123456789012.3456789"], "at most 6 decimals"),
        (["ask", "hi", "--model", "tiny", "--top-up", "0.0000001"], "at most 6 decimals"),
        (
            ["ask", "hi", "--model", "tiny", "--max-tokens", "0"],
            "'--max-tokens': Input should be greater than or equal to 1",
        ),
        (["ask", "hi"], "Missing option '--model'"),
        (["deposit", "1", "--key-file", "0x1234"], "a private key is 32 bytes of hex"),
        (["deposit", "1", "--key-file", "zz" * 32], "not a usable private key"),
        (["balance", "--key-file", "0x" + "00" * 32], "not a usable private key"),
        (["balance", "--key", "0x" + "11" * 32], "No such option: --key"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    if "--key-file" in args:  # what the key file holds
        at = args.index("--key-file") + 1
        args = [*args[:at], key_file(args[at]), *args[at + 1 :]]
    result = runner.invoke(app, ["client", *args])
    assert result.exit_code == 2, result.output
    assert message in flowing(result.output)


@pytest.mark.parametrize("url", ["ftp://gateway.example", "127.0.0.1:8000", "http://"])
def test_bad_gateway_url_is_a_usage_error(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_URL", url)
    result = strata("balance", key=Account.create())
    assert result.exit_code == 2, result.output
    assert f"{url!r} is not an http(s) URL" in flowing(result.output)


def test_malformed_client_key_setting_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIENT_KEY", "0xnot-a-key")
    result = strata("balance")
    assert result.exit_code == 2, result.output
    assert "a private key is 32 bytes of hex" in flowing(result.output)


@pytest.mark.parametrize(
    "command", [["deposit", "1"], ["ask", "hi", "--model", "tiny"], ["balance"], ["withdraw"]]
)
def test_missing_key_fails_with_a_code(command: list[str]) -> None:
    assert error_code(strata(*command, "--json")) == "missing_key"
    result = strata(*command)
    assert result.exit_code == 1
    assert "(missing_key)" in result.stderr and "CLIENT_KEY" in flowing(result.stderr)


def test_missing_deployment_fails_with_a_code() -> None:
    result = strata("balance", "--json", key=Account.create())
    assert error_code(result) == "configuration_error"
    assert "strata chain deploy" in json.loads(result.stdout)["error"]["message"]


@on_sqlite
def test_pay_prints_a_header_that_pays_a_plain_http_request(
    connected: GatewayServer, payer: LocalAccount, clean_environment: Path
) -> None:
    assert strata("deposit", "1", key=payer).exit_code == 0
    channel = saved_channel(clean_environment)
    body = {"model": "tiny", "prompt": "curl me", "max_tokens": 4, "temperature": 0}
    refused = httpx.post(connected.url + "/v1/completions", json=body, timeout=60)
    quote = next(
        o["amount"]
        for o in decode_header(refused.headers[PAYMENT_REQUIRED])["accepts"]
        if o["scheme"] == "voucher"
    )
    for _ in range(2):  # the second voucher must come out above the first and cover what was charged
        paid = strata("pay", quote, key=payer)
        assert paid.exit_code == 0, paid.output
        response = httpx.post(
            connected.url + "/v1/completions",
            json=body,
            headers={"PAYMENT-SIGNATURE": paid.stdout.strip()},
            timeout=60,
        )
        assert response.status_code == 200, response.text
    assert int(channel_state(connected.url, channel)["charged"]) > 0
    assert strata("pay", "0", key=payer).exit_code == 2
    assert strata("pay", "5").exit_code == 1  # no key
