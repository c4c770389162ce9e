"""`strata provider` stake, unstake, withdraw, status, ask and claim against real chains and real gateways, and
every way their arguments can be wrong.

Staking runs on the session's anvil (tests/conftest.py), rolled back after each test. Asks and claims run on a
market of this module's own: an anvil, a deployment and a gateway with its own database, in front of the
session's provider processes. Its epochs and claims then start from nothing, whatever other modules did.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import Result
from eth_account import Account
from eth_account.signers.local import LocalAccount
from typer.testing import CliRunner

from marketplace.cli import app
from marketplace.devnet.anvil import Anvil
from marketplace.devnet.process import free_port
from settlement.chain import Chain
from settlement.db.engine import blocking_sessions, create_blocking_engine
from settlement.deploy import ONE_TOKEN, Contracts
from settlement.epochs import EpochCloser
from tests.conftest import MIN_STAKE, UNBONDING_PERIOD_S, Actors, advance_time
from tests.marketplace.cli.keyfile import key_file
from tests.marketplace.harness import (
    GatewayServer,
    Market,
    ProviderProcess,
    announce,
    chat_body,
    database,
    gateway_settings,
    open_channel,
    post,
    requirement,
    start_market,
    start_provider,
    stop_providers,
    voucher_header,
    wait_ready,
)

SETTINGS = ("PROVIDER_KEY", "GATEWAY_URL", "GATEWAY_ADDRESSES", "CHAIN_ID", "RPC_URL", "DEPLOYMENT_FILE")
CHAT = "/v1/chat/completions"

runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env or .strata/deployment.json


def strata(*args: str, key: LocalAccount | None = None) -> Result:
    extra = ["--key-file", key_file(key)] if key is not None else []
    return runner.invoke(app, ["provider", *args, *extra])


def printed(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def refused(result: Result) -> dict[str, str]:
    """The ``{"code", "message"}`` of a command that was refused with --json."""
    assert result.exit_code == 1, result.output
    error: dict[str, str] = json.loads(result.stdout)["error"]
    return error


def flowing(text: str) -> str:
    """Text as one line: Rich wraps long lines and draws panels around usage errors."""
    return " ".join(text.replace("│", " ").split())


def shown(units: int) -> str:
    return f"{Decimal(units) / ONE_TOKEN:,.6f}"


def fresh_account(contracts: Contracts, admin: LocalAccount, tokens: int) -> LocalAccount:
    """A new account holding ``tokens`` base units and ether for gas."""
    account: LocalAccount = Account.create()
    contracts.token.mint(admin, to=account.address, amount=tokens)
    contracts.chain.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**20)])  # type: ignore[arg-type]
    return account


# -- staking, on the session's anvil -----------------------------------------------------------------------


@pytest.fixture
def on_chain(
    contracts: Contracts, anvil: Anvil, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Contracts:
    """Commands pointed at the session's deployment; no gateway answers at GATEWAY_URL."""
    deployment_file = tmp_path / "deployment.json"
    contracts.deployment.save(deployment_file)
    monkeypatch.setenv("RPC_URL", anvil.url)
    monkeypatch.setenv("DEPLOYMENT_FILE", str(deployment_file))
    monkeypatch.setenv("GATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    return contracts


def test_stake_then_status_shows_it(on_chain: Contracts, actors: Actors) -> None:
    provider = actors.providers[0]
    token, stake = on_chain.token, on_chain.stake
    held = token.balance_of(provider.address)
    assert not stake.is_active(provider.address)

    staked = printed(strata("stake", "150", "--json", key=provider))
    assert staked["provider"] == provider.address
    assert staked["amount"] == staked["staked"] == str(150 * ONE_TOKEN)
    assert staked["active"] is True and staked["txHash"].startswith("0x")
    assert stake.stake_of(provider.address).staked == 150 * ONE_TOKEN
    assert token.balance_of(provider.address) == held - 150 * ONE_TOKEN

    # A top-up approves again (the first stake used up the allowance) and adds to the bond.
    more = strata("stake", "12.5", key=provider)
    assert more.exit_code == 0, more.output
    assert f"has {shown(162_500_000)} bonded and is active" in flowing(more.stdout)

    status = printed(strata("status", "--json", key=provider))
    assert {k: status[k] for k in ("provider", "staked", "unbonding", "unbondsAt", "active", "minStake")} == {
        "provider": provider.address,
        "staked": str(162_500_000),
        "unbonding": "0",
        "unbondsAt": None,
        "active": True,
        "minStake": str(MIN_STAKE),
    }
    assert status["claimed"] == "0"
    # The gateway does not answer: the chain's figures are there, the gateway's are not, and it says why.
    figures = status["gateway"]
    assert figures["error"].startswith("http://127.0.0.1:") and "unreachable" in figures["error"]
    assert figures["asks"] is None and figures["earned"] is None and figures["claimable"] is None

    # Another provider's status needs no key; the table is for people.
    table = strata("status", provider.address)
    assert table.exit_code == 0, table.output
    text = flowing(table.stdout)
    assert f"Provider {provider.address}" in text
    assert f"staked {shown(162_500_000)}" in text and "active yes" in text
    assert f"min stake {shown(MIN_STAKE)}" in text
    assert "gateway figures unavailable" in flowing(table.stderr)


def test_stake_more_than_the_balance_is_refused_before_sending(on_chain: Contracts, actors: Actors) -> None:
    poor = fresh_account(on_chain, actors.admin, 50 * ONE_TOKEN)
    error = refused(strata("stake", "100", "--json", key=poor))
    assert error["code"] == "insufficient_balance"
    assert shown(50 * ONE_TOKEN) in error["message"] and shown(100 * ONE_TOKEN) in error["message"]
    assert on_chain.chain.nonce(poor.address) == 0  # not even an approval went out
    assert on_chain.token.balance_of(poor.address) == 50 * ONE_TOKEN

    text = strata("stake", "100", key=poor)
    assert text.exit_code == 1 and "(insufficient_balance)" in text.stderr


def test_stake_below_the_minimum_is_refused(on_chain: Contracts, actors: Actors) -> None:
    provider = actors.providers[1]
    sent = on_chain.chain.nonce(provider.address)
    error = refused(strata("stake", "99.999999", "--json", key=provider))
    assert error["code"] == "stake_below_minimum"
    assert shown(MIN_STAKE) in error["message"]
    assert on_chain.chain.nonce(provider.address) == sent
    # Once bonded at the minimum, a small top-up is fine.
    printed(strata("stake", "100", "--json", key=provider))
    assert printed(strata("stake", "0.000001", "--json", key=provider))["staked"] == str(MIN_STAKE + 1)


def test_unstake_more_than_staked_is_refused(on_chain: Contracts, actors: Actors) -> None:
    provider = actors.providers[0]
    error = refused(strata("unstake", "1", "--json", key=provider))
    assert error["code"] == "unstake_exceeds_stake"
    printed(strata("stake", "100", "--json", key=provider))
    error = refused(strata("unstake", "100.000001", "--json", key=provider))
    assert error["code"] == "unstake_exceeds_stake"
    assert shown(100_000_001) in error["message"] and shown(MIN_STAKE) in error["message"]
    assert on_chain.stake.stake_of(provider.address).unbonding == 0


def test_unstake_then_withdraw_after_unbonding(on_chain: Contracts, actors: Actors, chain: Chain) -> None:
    provider = actors.providers[2]
    token, stake = on_chain.token, on_chain.stake
    held = token.balance_of(provider.address)
    printed(strata("stake", "200", "--json", key=provider))

    unstaked = printed(strata("unstake", "150", "--json", key=provider))
    ends = stake.stake_of(provider.address).unbonds_at
    assert unstaked == {
        "provider": provider.address,
        "amount": str(150 * ONE_TOKEN),
        "staked": str(50 * ONE_TOKEN),
        "unbonding": str(150 * ONE_TOKEN),
        "unbondsAt": ends,
        "active": False,  # 50 bonded is below the minimum
        "txHash": unstaked["txHash"],
    }
    assert ends == chain.timestamp() + UNBONDING_PERIOD_S

    status = printed(strata("status", "--json", key=provider))
    assert status["unbonding"] == str(150 * ONE_TOKEN) and status["unbondsAt"] == ends
    assert status["active"] is False

    early = refused(strata("withdraw", "--json", key=provider))
    assert early["code"] == "unbonding_not_finished"
    assert "still unbonding" in early["message"] and "(in 1 h 0 min)" in early["message"]

    # Unstaking the rest restarts the clock for everything unbonding, and says so by its new end.
    advance_time(chain, 600)
    text = strata("unstake", "50", key=provider)
    assert text.exit_code == 0, text.output
    assert f"Unbonding {shown(200 * ONE_TOKEN)} tokens until" in flowing(text.stdout)
    assert "is no longer active" in flowing(text.stderr)
    ends = stake.stake_of(provider.address).unbonds_at
    assert ends == chain.timestamp() + UNBONDING_PERIOD_S

    advance_time(chain, UNBONDING_PERIOD_S - 60)
    assert refused(strata("withdraw", "--json", key=provider))["code"] == "unbonding_not_finished"
    advance_time(chain, 60)
    withdrawn = printed(strata("withdraw", "--json", key=provider))
    assert withdrawn["withdrawn"] == str(200 * ONE_TOKEN) and withdrawn["txHash"].startswith("0x")
    assert token.balance_of(provider.address) == held
    assert stake.stake_of(provider.address).unbonding == 0

    again = refused(strata("withdraw", "--json", key=provider))
    assert again["code"] == "nothing_to_withdraw"


def test_withdraw_with_nothing_unbonding_is_refused(on_chain: Contracts, actors: Actors) -> None:
    provider = actors.providers[0]
    assert refused(strata("withdraw", "--json", key=provider))["code"] == "nothing_to_withdraw"
    printed(strata("stake", "100", "--json", key=provider))
    text = strata("withdraw", key=provider)  # bonded, but nothing unbonding
    assert text.exit_code == 1 and "(nothing_to_withdraw)" in text.stderr
    assert "strata provider unstake" in flowing(text.stderr)


def test_ask_by_an_unstaked_provider_is_refused_before_the_gateway(
    on_chain: Contracts, actors: Actors
) -> None:
    args = ["ask", "--model-root", "0x" + "ab" * 32, "--layers", "0:2", "--price", "5", "--endpoint", "h:1"]
    args += ["--tls-fingerprint", "0x" + "cd" * 32]
    error = refused(strata(*args, "--json", key=actors.providers[0]))
    assert error["code"] == "inactive_provider" and "strata provider stake" in error["message"]
    assert (
        refused(strata("ask", "--withdraw", "--json", key=actors.providers[0]))["code"] == "inactive_provider"
    )


def test_claim_without_a_gateway_fails_with_a_code(on_chain: Contracts, actors: Actors) -> None:
    provider = actors.providers[0]
    sent = on_chain.chain.nonce(provider.address)
    error = refused(strata("claim", "--json", key=provider))
    assert error["code"] == "gateway_unavailable" and "unreachable" in error["message"]
    assert on_chain.chain.nonce(provider.address) == sent


def test_missing_key_fails_with_a_code(on_chain: Contracts) -> None:
    for command in (
        ["stake", "1"],
        ["unstake", "1"],
        ["withdraw"],
        ["status"],
        ["claim"],
        ["ask", "--withdraw"],
    ):
        error = refused(strata(*command, "--json"))
        assert error["code"] == "missing_key" and "PROVIDER_KEY" in error["message"]


def test_missing_deployment_fails_with_a_code() -> None:
    error = refused(strata("status", "--json", key=Account.create()))
    assert error["code"] == "configuration_error" and "strata chain deploy" in error["message"]


def test_provider_key_setting_is_read(
    on_chain: Contracts, actors: Actors, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROVIDER_KEY", actors.providers[1].key.to_0x_hex())
    assert printed(strata("status", "--json"))["provider"] == actors.providers[1].address


ROOT = "0x" + "ab" * 32


@pytest.mark.parametrize(
    "args, message",
    [
        (["stake", "abc"], "'abc' is not an amount"),
        (["stake", "--", "-1"], "'-1' must be positive"),
        (["unstake", "0"], "'0' must be positive"),
        (["unstake", "1.0000001"], "at most 6 decimals"),
        (["status", "0x1234"], "'0x1234' is not an Ethereum address"),
        (["claim", "--for", "nobody"], "'nobody' is not an Ethereum address"),
        (["stake", "1", "--key-file", "0x1234"], "a private key is 32 bytes of hex"),
        (["withdraw", "--key-file", "zz" * 32], "not a usable private key"),
        (["status", "--key-file", "0x" + "00" * 32], "not a usable private key"),
        (["status", "--key", "0x" + "11" * 32], "No such option: --key"),
        (["status", ROOT[:42], "--gateway", "ftp://gateway.example"], "is not an http(s) URL"),
        (["stake", "1", "--rpc", "127.0.0.1:8545"], "is not an http(s) JSON-RPC URL"),
        (["ask", "--model-root", "0x1234", "--layers", "0:2"], "is not a model root"),
        (["ask", "--model-root", ROOT, "--layers", "4:2"], "'4:2' is not a span start:end"),
        (["ask", "--model-root", ROOT, "--layers", "a:b"], "'a:b' is not a span start:end"),
        (["ask", "--model-root", ROOT, "--layers", "0:2", "--endpoint", "nowhere"], "is not a host:port"),
        (["ask", "--model-root", ROOT, "--layers", "0:2", "--endpoint", "h:1"], "needs a price"),
        (["ask", "--layers", "0:2", "--price", "5", "--endpoint", "h:1"], "needs the model's root"),
        (
            ["ask", "--model-root", ROOT, "--layers", "0:2", "--price", "5", "--endpoint", "h:1"],
            "fingerprint",
        ),
        (["ask", "--model-root", ROOT, "--tls-fingerprint", "0x12"], "is not a certificate fingerprint"),
        (["ask", "--model-root", ROOT, "--layers", "0:2", "--price", "0"], "greater than or equal to 1"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    if "--key-file" in args:  # what the key file holds
        at = args.index("--key-file") + 1
        args = [*args[:at], key_file(args[at]), *args[at + 1 :]]
    result = strata(*args)
    assert result.exit_code == 2, result.output
    assert message in flowing(result.output)


# -- asks and claims, on a market of this module's own ------------------------------------------------------


@dataclass
class OwnMarket:
    market: Market
    gateway: GatewayServer
    database_url: str
    root: str  # the tiny model's


@pytest.fixture(scope="module")
def own(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, providers: dict[str, ProviderProcess]
) -> Iterator[OwnMarket]:
    tmp = tmp_path_factory.mktemp("provider-cli")
    market = start_market(tmp)
    try:
        # Every anvil derives its accounts from one mnemonic, so the session's provider processes hold keys
        # that start_market staked here too; their tickets come from the same gateway key.
        assert [a.address for a in market.providers[:4]] == [p.account.address for p in providers.values()]
        with database("sqlite", tmp) as url:
            server = GatewayServer(gateway_settings(market, url, {"tiny": model_dir})).start()
            try:
                root = server.gateway.catalog.get("tiny").root
                for name in ("a", "b", "c"):
                    announce(server.url, providers[name], root)
                yield OwnMarket(market, server, url, root)
            finally:
                server.stop()
    finally:
        market.anvil.stop()


@pytest.fixture
def at_own(own: OwnMarket, monkeypatch: pytest.MonkeyPatch) -> OwnMarket:
    monkeypatch.setenv("RPC_URL", own.market.anvil.url)
    monkeypatch.setenv("DEPLOYMENT_FILE", str(own.market.deployment_file))
    monkeypatch.setenv("GATEWAY_URL", own.gateway.url)
    return own


def provider_view(own: OwnMarket, address: str) -> dict[str, Any]:
    response = httpx.get(f"{own.gateway.url}/v1/providers/{address}", timeout=30)
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


@pytest.fixture
def serving(at_own: OwnMarket, model_dir: Path, tmp_path: Path) -> Iterator[ProviderProcess]:
    """A fresh, funded, unstaked provider serving layers 4:6 with a hop server of its own, whose endpoint the
    gateway checks its asks against."""
    account = fresh_account(at_own.market.contracts, at_own.market.admin, 150 * ONE_TOKEN)
    env = {name: value for name, value in os.environ.items() if name != "GATEWAY_URL"}  # it does not announce
    node = start_provider(model_dir, account, (4, 6), at_own.market, log_dir=tmp_path, env=env)
    try:
        wait_ready(node)
        yield node
    finally:
        stop_providers([node])


def test_ask_posts_replaces_and_withdraws_on_the_gateway(at_own: OwnMarket, serving: ProviderProcess) -> None:
    own, node = at_own, serving
    provider = node.account
    # Far above the session providers' price: this ask is never on a route.
    price = 1_000_000_000
    ask = ["ask", "--model-root", own.root, "--layers", "4:6", "--capacity", "2"]
    ask += ["--endpoint", node.endpoint, "--tls-fingerprint", "0x" + node.fingerprint.hex()]

    assert refused(strata(*ask, "--price", str(price), "--json", key=provider))["code"] == "inactive_provider"
    assert httpx.get(f"{own.gateway.url}/v1/providers/{provider.address}").status_code == 404
    printed(strata("stake", "100", "--json", key=provider))

    before = printed(strata("status", "--json", key=provider))["gateway"]
    assert before["error"] is None
    assert (before["asks"], before["matchable"], before["sessionsServed"]) == (0, False, 0)
    assert (before["earned"], before["settled"], before["claimable"]) == ("0", "0", "0")
    nothing = refused(strata("claim", "--json", key=provider))
    assert nothing["code"] == "nothing_to_claim"
    assert own.market.contracts.chain.nonce(provider.address) == 2  # the approval and the stake only

    posted = printed(strata(*ask, "--price", str(price), "--json", key=provider))
    assert posted["provider"] == provider.address
    assert posted["ask"]["layers"] == [4, 6] and posted["ask"]["modelRoot"] == own.root
    assert posted["ask"]["pricePerMillion"] == str(price) and posted["ask"]["capacity"] == 2
    assert posted["matchableUntil"] is not None
    view = provider_view(own, provider.address)
    assert view["matchable"] and [a["id"] for a in view["asks"]] == [posted["ask"]["id"]]

    # The same span again replaces the ask.
    text = strata(*ask, "--price", str(2 * price), key=provider)
    assert text.exit_code == 0, text.output
    assert f"Ask posted: layers 4:6 of {own.root} at {2 * price}" in flowing(text.stdout)
    (live,) = provider_view(own, provider.address)["asks"]
    assert live["pricePerMillion"] == str(2 * price) and live["id"] != posted["ask"]["id"]

    status = printed(strata("status", "--json", key=provider))["gateway"]
    assert (status["asks"], status["matchable"], status["sessionsServed"]) == (1, True, 0)
    table = flowing(strata("status", key=provider).stdout)
    assert "live asks 1" in table and "sessions served 0" in table and f"claimable {shown(0)}" in table

    # Withdrawing a span that has no ask withdraws nothing; then all of this provider's asks.
    assert printed(strata("ask", "--withdraw", "--layers", "0:2", "--json", key=provider))["withdrawn"] == []
    withdrawn = printed(strata("ask", "--withdraw", "--json", key=provider))
    assert withdrawn == {
        "provider": provider.address,
        "withdrawn": [{"modelRoot": own.root, "layers": [4, 6]}],
    }
    assert provider_view(own, provider.address)["asks"] == []
    again = strata("ask", "--withdraw", key=provider)
    assert again.exit_code == 0 and "No live ask" in flowing(again.stdout)


def test_serve_by_an_unstaked_provider_stops_at_the_gateways_refusal(
    at_own: OwnMarket, model_dir: Path
) -> None:
    stranger: LocalAccount = Account.create()
    result = strata(
        "serve", "--model", str(model_dir), "--layers", "4:6", "--port", str(free_port()),
        "--trust-gateway", at_own.market.gateway_key.address, "--gateway", at_own.gateway.url, "--price", "5",
        key=stranger,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "(inactive_provider)" in result.stderr and "strata provider stake" in flowing(result.stderr)


def test_claim_pays_what_the_posted_root_owes(
    at_own: OwnMarket, providers: dict[str, ProviderProcess]
) -> None:

    own = at_own
    market, url = own.market, own.gateway.url
    token, distributor = market.contracts.token, market.contracts.distributor
    a, b = providers["a"].account, providers["b"].account

    # A paid request earns A, B and C their hops' shares.
    client = market.clients[0]
    channel = open_channel(market, client, 10 * ONE_TOKEN)
    body = chat_body("earn me something", max_tokens=8)
    offer = requirement(post(url, CHAT, body), "voucher")
    paid = post(url, CHAT, body, voucher_header(client, channel, int(offer["amount"]), offer))
    assert paid.status_code == 200, paid.text

    assert refused(strata("claim", "--json", key=a))["code"] == "nothing_to_claim"  # nothing settled yet
    engine = create_blocking_engine(own.database_url)
    try:
        report = EpochCloser(blocking_sessions(engine), market.contracts, market.operator).close()
    finally:
        engine.dispose()
    assert report.status == "posted"

    payout = httpx.get(f"{url}/v1/payouts/{a.address}", timeout=30).json()
    owed = int(payout["claimable"])
    assert owed > 0 and payout["epoch"] == report.epoch
    status = printed(strata("status", "--json", key=a))
    assert status["gateway"]["claimable"] == str(owed) and int(status["gateway"]["earned"]) >= owed

    held = token.balance_of(a.address)
    claimed = printed(strata("claim", "--json", key=a))
    assert claimed["provider"] == a.address and claimed["claimed"] == str(owed)
    assert claimed["cumulativeAmount"] == payout["cumulativeAmount"] and claimed["epoch"] == report.epoch
    assert claimed["txHash"].startswith("0x")
    assert token.balance_of(a.address) == held + owed
    assert distributor.claimed(a.address) == int(payout["cumulativeAmount"])
    assert printed(strata("status", "--json", key=a))["gateway"]["claimable"] == "0"
    assert refused(strata("claim", "--json", key=a))["code"] == "nothing_to_claim"

    # Anyone may claim for a provider: the client pays the gas, B gets the tokens.
    owed_b = int(httpx.get(f"{url}/v1/payouts/{b.address}", timeout=30).json()["claimable"])
    held_b, held_client = token.balance_of(b.address), token.balance_of(client.address)
    text = strata("claim", "--for", b.address, key=client)
    assert text.exit_code == 0, text.output
    assert f"Claimed {shown(owed_b)} tokens for {b.address}, gas paid by {client.address}" in flowing(
        text.stdout
    )
    assert token.balance_of(b.address) == held_b + owed_b
    assert token.balance_of(client.address) == held_client
