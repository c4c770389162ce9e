"""`strata up` and `strata demo`: the whole local marketplace as a user starts it, a paid request through it
down to a claimed payout, every balance checked on chain, and everything gone after Ctrl-C.

The end-to-end test runs twice: on the embedded defaults (SQLite, a redis-server `strata up` starts) and on
PostgreSQL with the Redis already running on this machine (in a database number nobody else uses). The epoch is
an hour long, so the only settlement is the one `strata demo` asks for.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from typer.testing import CliRunner

from marketplace.cli import app
from marketplace.devnet.errors import ServiceFailed
from marketplace.devnet.process import free_port
from marketplace.devnet.supervisor import Backoff, Supervisor
from settlement.chain import Chain
from settlement.deploy import ONE_TOKEN, Contracts, Deployment
from tests.marketplace.harness import database

STRATA = str(Path(sys.executable).with_name("strata"))
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
FUNDING = 10_000 * ONE_TOKEN  # what `strata up` mints to each demo account
STAKE = 100 * ONE_TOKEN  # the deployment's minimum stake, which each provider bonds
DEPOSIT = 10 * ONE_TOKEN  # `strata demo`'s default deposit
READY_TIMEOUT_S = 150
# Settings a developer's shell may hold; `strata up` must run on what the test gives it.
SETTINGS = (
    "DATABASE_URL", "REDIS_URL", "RPC_URL", "DEPLOYMENT_FILE", "GATEWAY_KEY", "MODELS", "OPERATOR_KEY",
    "DEPLOYER_KEY", "EPOCH_S", "GATEWAY_URL", "CLIENT_KEY", "PROVIDER_KEY", "GATEWAY_ADDRESSES",
    "VALIDATOR_KEY", "VALIDATOR_ADDRESSES", "SAMPLE_RATE",
)  # fmt: skip

runner = CliRunner()


def poll(what: str, check: Callable[[], Any], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.25)


def clean_env(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in SETTINGS}
    return {**env, **extra}


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _first_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    """The first line of ``process``'s stdout, or a failure with its stderr if it exits or times out first."""
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout_s)
    except queue.Empty:
        line = ""
    if not line:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        pytest.fail(
            f"strata up was not ready within {timeout_s} s (exit {process.returncode}):\n{err[-6000:]}"
        )
    return line


@contextmanager
def strata_up(
    state: Path, env: dict[str, str], *options: str
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """`strata up --json` on free ports; yields it with its summary once ready, then stops it with SIGINT
    (as Ctrl-C would) and checks that it left nothing running."""
    process = subprocess.Popen(
        [STRATA, "up", "--state-dir", str(state), "--port", str(free_port()),
         "--chain-port", str(free_port()), "--epoch-seconds", "3600", "--json", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=state.parent,
    )  # fmt: skip
    try:
        summary = json.loads(_first_line(process, READY_TIMEOUT_S))
        yield process, summary
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
            pytest.fail(f"strata up did not stop within 90 s after SIGINT:\n{err[-4000:]}")
    assert process.returncode == 0, err[-4000:]
    assert "Stopped." in err
    pids = [summary["gateway"]["pid"], summary["worker"]["pid"], *(p["pid"] for p in summary["providers"])]
    assert not [pid for pid in pids if alive(pid)]
    ports = [
        int(summary["gateway_url"].rsplit(":", 1)[1]),
        int(summary["rpc_url"].rsplit(":", 1)[1]),
        *(int(p["endpoint"].rsplit(":", 1)[1]) for p in summary["providers"]),
    ]
    if summary["redis_url"] != env.get("REDIS_URL"):  # the redis-server it started
        ports.append(int(summary["redis_url"].split(":")[2].split("/")[0]))
    assert not [port for port in ports if listening(port)]


@contextmanager
def spare_redis_db() -> Iterator[str]:
    """A URL of an empty database on the running Redis; afterwards, removes only the keys Celery and
    settlement create there."""
    try:
        probe = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        probe.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    probe.close()
    for number in range(15, 0, -1):
        client = redis.Redis.from_url(f"{REDIS_URL}/{number}")
        if client.dbsize() == 0:
            break
        client.close()
    else:
        pytest.skip(f"every database of {REDIS_URL} holds keys")
    try:
        yield f"{REDIS_URL}/{number}"
    finally:
        for pattern in ("celery*", "_kombu*", "unacked*", "strata:*"):
            for key in client.scan_iter(match=pattern):
                client.delete(key)
        client.close()


@contextmanager
def backend_env(backend: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    if backend == "embedded":
        yield clean_env()
        return
    with database("postgresql", tmp_path) as database_url, spare_redis_db() as redis_url:
        yield clean_env(DATABASE_URL=database_url, REDIS_URL=redis_url)


@pytest.mark.parametrize("backend", ["embedded", "postgresql"])
def test_up_then_demo_pays_settles_and_claims(backend: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with backend_env(backend, tmp_path) as env, strata_up(state, env) as (_process, summary):
        if backend == "postgresql":
            assert summary["database_url"] == env["DATABASE_URL"]
            assert summary["redis_url"] == env["REDIS_URL"]
        else:
            assert summary["database_url"] == f"sqlite:///{state / 'gateway.db'}"
        devnet = json.loads((state / "devnet.json").read_text())
        assert devnet["gateway_url"] == summary["gateway_url"]
        assert devnet["redis_url"] == summary["redis_url"]

        demo = subprocess.run(
            [STRATA, "demo", "--state-dir", str(state), "--json"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert demo.returncode == 0, demo.stdout + demo.stderr[-4000:]
        report = json.loads(demo.stdout)
        assert report["ok"], report["checks"]

        gateway = summary["gateway_url"]
        accounts = {role: a["address"] for role, a in summary["accounts"].items()}
        payouts = {
            role: httpx.get(f"{gateway}/v1/payouts/{accounts[role]}", timeout=10).json()
            for role in ("provider-1", "provider-2", "provider-3", "treasury")
        }
        chain = Chain(summary["rpc_url"])
        contracts = Contracts.load(chain, Deployment.load(Path(summary["deployment_file"])))
        token, distributor = contracts.token, contracts.distributor

        charged = int(report["charged"])
        assert 0 < charged <= int(report["paymentRequired"]["accepts"][0]["amount"])
        assert report["epoch"]["status"] == "posted"
        assert int(report["epoch"]["settled"]) == charged

        # The client deposited, and the escrow took exactly the charge from its channel.
        client = accounts["client-1"]
        channel = contracts.escrow.channel(bytes.fromhex(report["channelId"][2:]))
        assert token.balance_of(client) == FUNDING - DEPOSIT
        assert (channel.deposit, channel.claimed) == (DEPOSIT, charged)

        # Every base unit of the charge went to the distributor: providers' pool and the platform's fee.
        fees = distributor.fees_paid()
        assert distributor.funded() == charged
        assert fees == charged - charged * 8_000 // 10_000
        assert token.balance_of(accounts["treasury"]) == fees
        earnings = sum(int(payouts[role]["settled"]) for role in ("provider-1", "provider-2", "provider-3"))
        treasury_leaf = int(payouts["treasury"]["settled"])
        assert (
            distributor.provider_total() == earnings + treasury_leaf == int(report["epoch"]["providerTotal"])
        )
        assert earnings == sum(int(payouts[r]["earned"]) for r in ("provider-1", "provider-2", "provider-3"))
        assert all(int(payouts[r]["settled"]) > 0 for r in ("provider-1", "provider-2", "provider-3"))

        # provider-1 claimed what it was due; the others have yet to.
        claimed = int(report["claim"]["amount"])
        assert claimed == int(report["payout"]["claimable"]) == int(payouts["provider-1"]["settled"])
        assert token.balance_of(accounts["provider-1"]) == FUNDING - STAKE + claimed
        assert distributor.claimed(accounts["provider-1"]) == claimed
        for role in ("provider-2", "provider-3"):
            assert token.balance_of(accounts[role]) == FUNDING - STAKE
            assert int(payouts[role]["claimable"]) == int(payouts[role]["settled"])
        assert token.balance_of(distributor.address) == charged - fees - claimed

        # The demo's own before/after figures say the same.
        before, after = report["before"], report["after"]
        assert int(before["client-1"]["balance"]) - int(after["client-1"]["balance"]) == DEPOSIT
        assert int(after["provider-1"]["balance"]) - int(before["provider-1"]["balance"]) == claimed
        assert int(after["treasury"]["balance"]) - int(before["treasury"]["balance"]) == fees
        assert report["ledger"] == {
            "charges": str(charged),
            "providerEarnings": str(earnings),
            "platformFees": str(charged - earnings),
            "treasuryLeaf": str(treasury_leaf),
        }


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.fixture
def in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env, and .strata/ lands in the test's own directory
    return tmp_path


@pytest.mark.parametrize("which", ["--port", "--chain-port"])
def test_up_on_a_port_in_use_fails_with_a_code(which: str, in_tmp: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"--port": str(free_port()), "--chain-port": str(free_port()), which: str(busy)}
        result = runner.invoke(app, ["up", *(x for pair in ports.items() for x in pair), "--json"])
    assert result.exit_code == 1, result.output
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "port_in_use"
    assert str(busy) in error["message"]
    assert not (in_tmp / ".strata").exists()  # nothing was started


def test_up_with_one_port_for_both_is_a_usage_error(in_tmp: Path) -> None:
    port = str(free_port())
    result = runner.invoke(app, ["up", "--port", port, "--chain-port", port])
    assert result.exit_code == 2


def test_up_with_an_unreachable_redis_fails_with_a_code(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    args = ["up", "--port", str(free_port()), "--chain-port", str(free_port()), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["error"]["code"] == "broker_unavailable"


def test_demo_with_nothing_running_fails_with_a_code(in_tmp: Path) -> None:
    result = runner.invoke(app, ["demo", "--json"])
    assert result.exit_code == 1, result.output
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "marketplace_not_running"
    assert "strata up" in error["message"]


def test_demo_against_a_stopped_marketplace_fails_with_a_code(in_tmp: Path) -> None:
    """A devnet file left behind by a `strata up` that has stopped."""
    state = in_tmp / "state"
    state.mkdir()
    gone = f"http://127.0.0.1:{free_port()}"
    (state / "devnet.json").write_text(
        json.dumps(
            {
                "rpc_url": gone,
                "gateway_url": gone,
                "redis_url": "redis://127.0.0.1:1/0",
                "database_url": "sqlite:///x.db",
                "model": {"name": "tiny"},
                "accounts": {},
            }
        )
    )
    result = runner.invoke(app, ["demo", "--state-dir", str(state), "--json"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["error"]["code"] == "marketplace_not_running"


def test_demo_refuses_a_chain_only_devnet(in_tmp: Path) -> None:
    """`strata chain up` writes a devnet file too, without a gateway."""
    state = in_tmp / "state"
    state.mkdir()
    (state / "devnet.json").write_text(json.dumps({"rpc_url": "http://127.0.0.1:8545", "accounts": {}}))
    result = runner.invoke(app, ["demo", "--state-dir", str(state), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "marketplace_not_running"


# -- the supervisor ----------------------------------------------------------------------------------------

# A child that records its SIGTERM in a file, or ignores it, then sleeps.
CHILD = """
import signal, sys, time
name, record, obey = sys.argv[1], sys.argv[2], sys.argv[3] == "obey"
def stop(*_):
    with open(record, "a") as f:
        f.write(name + "\\n")
    if obey:
        sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print(name, "ready", flush=True)
while True:
    time.sleep(0.05)
"""


def test_supervisor_stops_users_before_services_and_kills_the_deaf(tmp_path: Path) -> None:
    record = tmp_path / "stopped.txt"
    supervisor = Supervisor(tmp_path / "logs", stop_timeout_s=1.0)
    env = dict(os.environ)
    spawned = {
        name: supervisor.spawn(
            name, [sys.executable, "-c", CHILD, name, str(record), mode], env=env, tier=tier
        )
        for name, tier, mode in [("service", 1, "obey"), ("user", 3, "obey"), ("deaf", 3, "ignore")]
    }
    for child in spawned.values():
        supervisor.wait_until(child.name, lambda c=child: c.log is not None and "ready" in c.log.read_text())
    started = time.monotonic()
    supervisor.stop_all()
    assert time.monotonic() - started < 10
    order = record.read_text().split()
    assert set(order[:2]) == {"user", "deaf"} and order[2:] == ["service"]
    assert not [child.name for child in spawned.values() if child.alive()]


def test_supervisor_reports_a_child_that_dies_at_start_up(tmp_path: Path) -> None:
    supervisor = Supervisor(tmp_path / "logs")
    script = "import sys; print('cannot open the model'); sys.exit(3)"
    supervisor.spawn("provider-1", [sys.executable, "-c", script], env=dict(os.environ), tier=3)
    with pytest.raises(ServiceFailed) as failed:
        supervisor.wait_until("provider-1", lambda: False, timeout_s=30)
    assert failed.value.code == "service_exited"
    assert "provider-1 exited with code 3" in str(failed.value)
    assert failed.value.log is not None and "cannot open the model" in failed.value.log.read_text()
    supervisor.stop_all()


def test_up_with_a_cheater_slashes_it_and_gives_its_clients_their_money_back(tmp_path: Path) -> None:
    """`strata up --cheaters 1`: a provider skipping a layer undercuts the honest one on layers 0:2 and takes
    the first job; the validator re-executes the hop, slashes it on chain before any epoch closes, its asks
    leave the book, the next job goes to the honest provider, and the epoch collects only the honest job."""
    from eth_utils.crypto import keccak

    from marketplace.client import ChannelWallet, StrataClient, fund_channel
    from marketplace.devnet.demo import close_epoch, connect
    from settlement.contracts import random_channel_id

    state = tmp_path / "state"
    with strata_up(state, clean_env(), "--cheaters", "1") as (_process, summary):
        gateway = summary["gateway_url"]
        cheater = next(p for p in summary["providers"] if p["role"] == "cheater-1")
        honest = next(p for p in summary["providers"] if p["role"] == "provider-1")
        assert cheater["layers"] == honest["layers"] == "0:2"
        market = connect(state)
        stake, token, escrow = market.contracts.stake, market.contracts.token, market.contracts.escrow
        validator = summary["accounts"]["validator"]["address"]
        client = market.account("client-1")
        channel = random_channel_id(client.address)

        async def ask(wallet: ChannelWallet) -> str:
            async with StrataClient(gateway, wallet) as strata:
                reply = await strata.chat(
                    market.model,
                    [{"role": "user", "content": "are you honest?"}],
                    max_tokens=6,
                    temperature=0,
                )
            return "0x" + str(reply["id"]).removeprefix("chatcmpl-")

        def job(job_id: str) -> dict[str, Any]:
            return dict(httpx.get(f"{gateway}/v1/jobs/{job_id}", timeout=10).json())

        held = asyncio.run(fund_channel(market.contracts, client, channel, DEPOSIT))
        wallet = ChannelWallet(
            client, channel, escrow=escrow.address, chain_id=market.contracts.chain.chain_id, deposit=held
        )
        assert stake.stake_of(cheater["address"]).staked == STAKE
        cheated = asyncio.run(ask(wallet))
        poll("the cheating job voided, its other hops validated", lambda: job(cheated)["cleared"])
        first = job(cheated)
        assert first["voided"] and int(first["charged"]) > 0

        # Slashed on chain: the whole stake, half of it to the validator as challenger.
        assert stake.stake_of(cheater["address"]).staked == 0
        assert not stake.is_active(cheater["address"])
        assert token.balance_of(validator) == FUNDING + STAKE // 2
        slashes = httpx.get(f"{gateway}/v1/slashes", params={"provider": cheater["address"]}).json()["data"]
        assert len(slashes) == 1 and slashes[0]["status"] == "slashed" and slashes[0]["job"] == cheated
        evidence = httpx.get(f"{gateway}/v1/slashes/{slashes[0]['id']}").json()
        assert "0x" + keccak(evidence["evidence"].encode()).hex() == slashes[0]["id"]
        assert stake.evidence_used(bytes.fromhex(slashes[0]["id"][2:]))
        document = json.loads(evidence["evidence"])
        assert document["reason"] == "output_mismatch" and document["hop"]["provider"] == cheater["address"]
        # Its client is charged nothing for the job: the gateway's channel total went back down.
        channel_view = httpx.get(f"{gateway}/v1/channels/0x{channel.hex()}").json()
        assert int(channel_view["charged"]) == 0

        # The cheater's asks leave the book; the next job takes the honest route and clears.
        poll(
            "the cheater's asks pulled",
            lambda: (
                not httpx.get(f"{gateway}/v1/asks", params={"provider": cheater["address"]}).json()["data"]
            ),
        )
        honest_job = asyncio.run(ask(wallet))
        poll("the honest job cleared", lambda: job(honest_job)["cleared"])
        second = job(honest_job)
        assert not second["voided"]
        assert httpx.get(f"{gateway}/v1/slashes").json()["data"] == slashes

        report = close_epoch(summary["redis_url"], 60)
        assert int(report["settled"]) == int(second["charged"])
        # On chain the channel pays for the honest job only; the rest of the deposit is still the client's.
        assert escrow.channel(channel).claimed == int(second["charged"])
        assert market.contracts.distributor.funded() == int(second["charged"])


# -- supervision -------------------------------------------------------------------------------------------


def test_supervisor_restarts_a_child_after_a_back_off_that_grows_and_appends_to_its_log(
    tmp_path: Path,
) -> None:
    now = [0.0]
    supervisor = Supervisor(
        tmp_path / "logs", backoff=Backoff(first_s=1, max_s=4, steady_s=10), clock=lambda: now[0]
    )
    script = "import sys; print('run', flush=True); sys.exit(3)"
    child = supervisor.spawn("flaky", [sys.executable, "-c", script], env=dict(os.environ), tier=3)
    said: list[str] = []
    delays = []
    try:
        for _ in range(4):
            child.handle.wait(30)  # let it die
            supervisor.check(said.append)  # noticed: a restart is scheduled
            assert child.restart_at is not None
            delays.append(child.restart_at - now[0])
            supervisor.check(said.append)  # not due yet
            assert child.restart_at is not None
            now[0] = child.restart_at
            supervisor.check(said.append)  # restarted
            assert child.restart_at is None
        child.handle.wait(30)
        now[0] += 10  # ran a minute's worth before dying: the count starts over
        supervisor.check(said.append)
        assert child.restart_at == now[0] + 1
    finally:
        supervisor.stop_all()
    assert delays == [1, 2, 4, 4]
    assert said[0] == "flaky exited with code 3 after 0 s; restarting it in 1 s"
    assert said[1].startswith("flaky restarted (pid ")
    assert child.log is not None and child.log.read_text().split() == ["run"] * 5


def test_up_restarts_a_killed_provider_broker_and_worker_and_the_marketplace_carries_on(
    tmp_path: Path,
) -> None:
    """Under a client's steady traffic, `strata up` loses a provider, its redis-server and its settlement worker
    (SIGKILL, one after another), restarts each, and keeps serving: every request either succeeds or fails
    with a clear code while a span has nobody, none hangs, and an epoch afterwards settles exactly what the
    succeeded requests were charged."""
    from marketplace.client import ChannelWallet, PaymentFailed, StrataClient, fund_channel
    from marketplace.devnet.demo import close_epoch, connect
    from settlement.contracts import random_channel_id

    state = tmp_path / "state"
    with strata_up(state, clean_env(), "--sample-rate", "0") as (_process, summary):
        gateway = summary["gateway_url"]
        market = connect(state)
        client = market.account("client-1")
        channel = random_channel_id(client.address)
        held = asyncio.run(fund_channel(market.contracts, client, channel, DEPOSIT))
        wallet = ChannelWallet(
            client, channel, escrow=market.contracts.escrow.address, chain_id=market.contracts.chain.chain_id,
            deposit=held,
        )  # fmt: skip
        outcomes: list[str] = []
        charged: list[int] = []
        stop = threading.Event()

        async def traffic() -> None:
            async with StrataClient(gateway, wallet, timeout_s=60) as strata:
                while not stop.is_set():
                    try:
                        reply = await strata.chat(
                            market.model, [{"role": "user", "content": "still there?"}], max_tokens=3
                        )
                    except PaymentFailed as exc:
                        outcomes.append(exc.code or "no_code")
                        await asyncio.sleep(0.5)
                        continue
                    outcomes.append("ok")
                    job = httpx.get(
                        f"{gateway}/v1/jobs/0x{str(reply['id']).removeprefix('chatcmpl-')}", timeout=10
                    )
                    charged.append(int(job.json()["charged"]))

        def successes() -> int:
            return outcomes.count("ok")

        sender = threading.Thread(target=lambda: asyncio.run(traffic()), daemon=True)
        sender.start()
        try:
            poll("traffic flowing", lambda: successes() >= 2)

            provider = next(p for p in summary["providers"] if p["role"] == "provider-2")
            os.kill(provider["pid"], signal.SIGKILL)
            port = int(provider["endpoint"].rsplit(":", 1)[1])
            poll("provider-2 gone", lambda: not listening(port), timeout_s=30)
            poll("provider-2 back and announced", lambda: listening(port), timeout_s=90)
            served = successes()
            poll("traffic through the restarted provider", lambda: successes() >= served + 2, timeout_s=90)

            os.kill(summary["redis"]["pid"], signal.SIGKILL)
            broker = redis.Redis.from_url(summary["redis_url"], socket_connect_timeout=1)
            poll("redis-server back", lambda: _pings(broker), timeout_s=60)
            served = successes()
            poll("traffic after the broker's restart", lambda: successes() >= served + 2, timeout_s=60)

            os.kill(summary["worker"]["pid"], signal.SIGKILL)
            worker_log = Path(summary["worker"]["log"])
            poll(
                "the worker ready again", lambda: worker_log.read_text().count(" ready.") >= 2, timeout_s=120
            )
            served = successes()
            poll("traffic after the worker's restart", lambda: successes() >= served + 1, timeout_s=60)
        finally:
            stop.set()
            sender.join(timeout=90)
        assert not sender.is_alive(), "a request hung"
        assert successes() >= 7
        assert set(outcomes) <= {"ok", "no_route", "route_failed"}, outcomes
        broker.close()

        report = close_epoch(summary["redis_url"], 120)  # the restarted worker runs it
        assert int(report["settled"]) == sum(charged)
        assert market.contracts.escrow.channel(channel).claimed == sum(charged)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
