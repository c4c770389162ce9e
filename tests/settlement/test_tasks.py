"""The Celery tasks through a real worker process and a real Redis: the running one at 127.0.0.1:6379 (as in
CI) and a redis-server started here (the embedded default)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from marketplace.devnet.redis_server import RedisServer
from marketplace.gateway.service import MeteringQueue
from settlement.config import SettlementSettings
from settlement.db.engine import create_engine, sessions
from settlement.db.schema import LedgerEntry
from settlement.deploy import Contracts
from settlement.errors import UnknownJob
from settlement.report import ledger_and_chain
from settlement.tasks import CLOSE_EPOCH, METER_JOB, claim_validation, make_app
from settlement.testing.ledger import Recorder, ledger_sessions
from tests.conftest import Actors
from tests.marketplace.harness import database

ONE = 10**6
SYSTEM_REDIS = "redis://127.0.0.1:6379"


@pytest.fixture(params=["system", "embedded"])
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "embedded":
        with RedisServer() as server:
            yield server.url
        return
    try:
        redis.Redis.from_url(SYSTEM_REDIS, socket_connect_timeout=2).ping()
    except redis.ConnectionError as exc:
        pytest.skip(f"no Redis at {SYSTEM_REDIS}: {exc}")
    # A database of its own, emptied afterwards, so parallel runs and other users of this Redis are untouched.
    number = 1 + uuid.uuid4().int % 15
    url = f"{SYSTEM_REDIS}/{number}"
    yield url
    redis.Redis.from_url(url).flushdb()


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    with database("sqlite", tmp_path) as made:
        yield made


@pytest.fixture
def worker(
    redis_url: str, url: str, contracts: Contracts, actors: Actors, tmp_path: Path
) -> Iterator[Celery]:
    deployment = tmp_path / "deployment.json"
    contracts.deployment.save(deployment)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "REDIS_URL": redis_url,
        "RPC_URL": contracts.chain.rpc_url,
        "DEPLOYMENT_FILE": str(deployment),
        "OPERATOR_KEY": "0x" + actors.operator.key.hex(),
        "EPOCH_S": "3600",
    }
    celery = Path(sys.executable).parent / "celery"
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen(
        [
            str(celery),
            "-A",
            "settlement.tasks",
            "worker",
            "--concurrency",
            "1",
            "--pool",
            "solo",
            "-Q",
            "celery",
        ],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield make_app(SettlementSettings(redis_url=redis_url, _env_file=None))  # type: ignore[call-arg]
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def recorder(url: str, contracts: Contracts, actors: Actors, tmp_path: Path) -> Iterator[Recorder]:
    with ledger_sessions(url) as sessions:
        recorder = Recorder(sessions, contracts, actors.providers)
        recorder.open_channel(actors.payers[0], 5 * ONE)
        yield recorder


def test_the_worker_meters_jobs_and_closes_epochs(worker: Celery, recorder: Recorder, actors: Actors) -> None:
    job_id = recorder.voucher_job(actors.payers[0], tokens=50_000, headroom=10)
    metered = worker.send_task(METER_JOB, args=[job_id]).get(timeout=120)
    assert metered == {
        "jobId": job_id,
        "metered": True,
        "charge": "450",
        "entries": 3,
        "refused": {},
        "sampled": [],
    }
    assert _entries(recorder.sessions) == 3

    # Delivered twice, the task writes nothing more.
    assert worker.send_task(METER_JOB, args=[job_id]).get(timeout=60)["charge"] == "450"
    assert _entries(recorder.sessions) == 3

    recorder.voucher_job(actors.payers[0], tokens=70_000)  # left to close_epoch to meter
    report = worker.send_task(CLOSE_EPOCH).get(timeout=180)
    assert (report["status"], report["epoch"], report["settled"]) == ("posted", 1, str(450 + 630))
    assert ledger_and_chain(recorder.sessions, recorder.contracts).matches
    assert worker.send_task(CLOSE_EPOCH).get(timeout=120)["status"] == "idle"

    # A job the database does not have is refused, and the worker carries on.
    with pytest.raises(UnknownJob, match="no job"):
        worker.send_task(METER_JOB, args=["0x" + "00" * 32]).get(timeout=60)
    assert _entries(recorder.sessions) == 6


def _entries(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return len(session.scalars(select(LedgerEntry)).all())


def test_a_validation_on_its_way_is_not_queued_again(redis_url: str) -> None:
    """Every epoch close queues each undone validation; one already queued, running or waiting to retry is
    claimed, so its retries never pile up. The claim lapses, for a chain lost with its worker."""
    client = redis.Redis.from_url(redis_url)
    assert claim_validation(client, 7)
    assert not claim_validation(client, 7)
    assert claim_validation(client, 8)
    ttl = client.ttl("strata:validate:queued:7")
    assert 0 < ttl <= 30 * 60
    client.delete("strata:validate:queued:7")  # the chain ended: decided, or failed on the validator's side
    assert claim_validation(client, 7)


def test_an_exit_on_a_channel_owing_charges_asks_for_an_epoch_now(
    worker: Celery, recorder: Recorder, actors: Actors, url: str
) -> None:
    """The gateway sees a payer start to leave a channel it charged beyond what was redeemed: it queues
    close_epoch at once rather than waiting for the schedule (an hour here), and the worker redeems it."""
    payer = actors.payers[0]
    recorder.voucher_job(payer, tokens=50_000)
    channel = recorder.channels[payer.address]
    recorder.contracts.escrow.initiate_withdraw(payer, channel=channel)
    owing, settled = channel, bytes(32)  # the second: a channel nobody charged, which asks for nothing

    async def seen() -> None:
        engine = create_engine(url)
        queue = MeteringQueue(worker.conf.broker_url)
        try:
            queue.redeem_if_owed(sessions(engine), settled)
            queue.redeem_if_owed(sessions(engine), owing)
            await queue.close()
        finally:
            await engine.dispose()

    asyncio.run(seen())
    deadline = time.monotonic() + 120
    while recorder.contracts.distributor.epoch() == 0:
        assert time.monotonic() < deadline, "no epoch was closed"
        time.sleep(0.5)
    assert recorder.contracts.escrow.channel(channel).claimed == 450
    assert ledger_and_chain(recorder.sessions, recorder.contracts).matches
