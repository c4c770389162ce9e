"""The whole marketplace on this machine, started under a :class:`Supervisor` (what `strata up` runs):

    anvil          the chain on ``chain_port``: contracts deployed, one dev account per role, demo accounts funded
    redis-server   Celery's broker and result backend, unless REDIS_URL names a Redis
    (database)     SQLite under the state directory unless DATABASE_URL names one; migrated to the newest schema
    gateway        `strata gateway serve` on ``port``, with the devnet's gateway key, which providers trust; the
                   exact payments it takes go to the operator, who forwards them at settlement
    provider-1..3  `strata provider serve`, each staked with the minimum stake, serving a third of the layers
                   of a tiny local model at its own price, announced to the gateway
    cheater-N      with ``cheaters``: staked like the others, serving the N-th third dishonestly (``--cheat``)
                   10% cheaper than the honest provider, so that it is routed to until a validator slashes it
    worker         `celery -A settlement.tasks worker -B -Q celery`: metering and an epoch closed every
                   ``epoch_s``, with the operator's key only
    validator      `celery -A settlement.tasks worker -Q validation`: re-executes ``sample_rate`` of the billed
                   hops, with the validator's key only (a process of its own, so neither key sits beside the other)

Everything it writes is under the state directory (``.strata``): ``deployment.json``; ``devnet.json``, the
accounts with their development keys and every service's URL, which `strata demo` reads, and ``keys/ROLE.key``,
each account's key for `--key-file` (all of these mode 0600); ``models/tiny``;
``logs/<name>.log`` for each process it starts; the beat schedule; and the SQLite database.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import redis
from rich.console import Console
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from marketplace.devnet import market
from marketplace.devnet.chain import Devnet, key_hex, start_devnet
from marketplace.devnet.errors import ServiceFailed
from marketplace.devnet.private import without_keys
from marketplace.devnet.process import free_port, printed
from marketplace.devnet.providers import ProviderLaunch, script
from marketplace.devnet.redis_server import RedisServer
from marketplace.devnet.supervisor import (
    TIER_BROKER,
    TIER_CHAIN,
    TIER_GATEWAY,
    TIER_USERS,
    Service,
    Supervisor,
    log_has_line,
    step,
)
from marketplace.provider.staking import bond
from settlement.config import SettlementSettings
from settlement.db.engine import create_blocking_engine, migrate
from settlement.db.schema import Channel, Epoch, Job
from settlement.deploy import ONE_TOKEN, DeployParams
from settlement.tasks import SETTLEMENT_QUEUE, VALIDATION_QUEUE

WORKER_APP = "settlement.tasks"


@dataclass(frozen=True)
class Options:
    port: int  # the gateway's, on 127.0.0.1
    chain_port: int  # anvil's
    epoch_s: float  # between the settlement worker's epoch closes
    state_dir: Path
    params: DeployParams
    cheaters: int = 0
    cheat: str = "skip-layer"
    sample_rate: float = 1.0  # probability that the validator re-executes a billed hop


def start(supervisor: Supervisor, options: Options, out: Console) -> tuple[dict[str, Any], Devnet]:
    """Starts everything, each service once what it needs answers; returns the summary `strata up` prints
    (and writes to the devnet file) and the devnet."""
    state = options.state_dir
    state.mkdir(parents=True, exist_ok=True)
    settings = SettlementSettings()
    if "database_url" in settings.model_fields_set:
        database_url = settings.database_url
        prepare_database(database_url, embedded=None, out=out)
    else:
        database_url = f"sqlite:///{state / 'gateway.db'}"
        prepare_database(database_url, embedded=state / "gateway.db", out=out)
    if settings.redis_url:
        check_redis(settings.redis_url)

    devnet = start_devnet(
        port=options.chain_port,
        deployment_file=state / "deployment.json",
        params=options.params,
        status=out,
        log_path=supervisor.log_dir / "anvil.log",
    )

    anvil = supervisor.adopt("anvil", devnet.anvil, tier=TIER_CHAIN)
    redis_pid = None
    if settings.redis_url:
        redis_url = settings.redis_url
    else:
        server = RedisServer(log_path=supervisor.log_dir / "redis.log")
        with step(out, "Starting redis-server…"):
            server.start()
        redis_pid = supervisor.adopt("redis", server, tier=TIER_BROKER).pid
        redis_url = server.url

    model_dir = state / "models" / market.MODEL_NAME
    with step(out, f"Preparing the tiny model in {model_dir}…"):
        market.tiny_model(model_dir)
        from marketplace.gateway.catalog import load_model  # torch: imported only when a model is loaded

        model = load_model(model_dir, market.MODEL_NAME)  # writes the manifest before several processes would
    offers = market.offers(model.num_layers, options.cheaters)
    min_stake = stake_providers(devnet, [offer.role for offer in offers], out)

    common_env = {
        **without_keys(dict(os.environ)),
        "PYTHONUNBUFFERED": "1",
        "RPC_URL": devnet.rpc_url,
        "DEPLOYMENT_FILE": str(devnet.deployment_file),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
    }
    models = json.dumps([f"{market.MODEL_NAME}={model_dir}"])
    gateway_url = f"http://127.0.0.1:{options.port}"
    gateway = supervisor.spawn(
        "gateway",
        [script("strata"), "gateway", "serve", "--host", "127.0.0.1", "--port", str(options.port)],
        env={
            **common_env,
            "GATEWAY_KEY": key_hex(devnet.accounts["gateway"]),
            "MODELS": models,
            # Every process of the devnet reaches the gateway from 127.0.0.1: one address's bucket would let a busy
            # client starve the providers' asks and heartbeats. Payers are still limited each (on Redis).
            "RATE_LIMIT_IP_PER_S": os.environ.get("RATE_LIMIT_IP_PER_S", "0"),
        },
        tier=TIER_GATEWAY,
    )
    # The workers need only the broker, the database and the chain: they start while the gateway does.
    worker_env, validator_env = worker_environments(devnet, common_env, models, options)
    worker = supervisor.spawn("worker", worker_command(state), env=worker_env, tier=TIER_USERS)
    validator = supervisor.spawn("validator", validator_command(), env=validator_env, tier=TIER_USERS)
    with step(out, f"Starting the gateway on {gateway_url}…"):
        supervisor.wait_until("the gateway", lambda: gateway_health(gateway_url) is not None)

    # Providers announce themselves to the gateway as they start, so they start once it answers.
    launches = [
        ProviderLaunch(
            model_dir,
            offer.layers,
            free_port(),
            trust_gateway=devnet.accounts["gateway"].address,
            deployment=devnet.deployment_file,
            tls_dir=state / "tls" / offer.role,
            retained_dir=state / "retained" / offer.role,
            gateway_url=gateway_url,
            price=offer.price,
            extra=("--cheat", options.cheat) if offer.cheats else (),
        )
        for offer in offers
    ]
    providers = [
        spawn_provider(supervisor, offer.role, launch, key_hex(devnet.accounts[offer.role]), common_env)
        for offer, launch in zip(offers, launches, strict=True)
    ]
    with step(out, f"Starting {len(providers)} providers…"):
        for provider in providers:
            assert provider.log is not None
            supervisor.wait_until(provider.name, printed(provider.log))

        def announced() -> bool:
            health = gateway_health(gateway_url)
            return health is not None and int(health.get("asks", 0)) >= len(providers)

        supervisor.wait_until("the providers' asks", announced)
    with step(out, "Starting the settlement worker and the validator…"):
        supervisor.wait_until("the settlement worker", log_has_line(worker.log, celery_ready))
        supervisor.wait_until("the validator", log_has_line(validator.log, celery_ready))

    services = {
        "gateway_url": gateway_url,
        "redis_url": redis_url,
        "database_url": database_url,
        "model": {
            "name": market.MODEL_NAME,
            "root": model.root,
            "path": str(model_dir),
            "layers": model.num_layers,
        },
        "epoch_s": options.epoch_s,
        "pid": os.getpid(),
    }
    devnet_file = devnet.write(**services)
    summary = {
        "status": "ready",
        "rpc_url": devnet.rpc_url,
        "chain_id": devnet.chain_id,
        "deployment_file": str(devnet.deployment_file),
        "devnet_file": str(devnet_file),
        **services,
        "gateway": {
            "address": devnet.accounts["gateway"].address,
            "pid": gateway.pid,
            "log": str(gateway.log),
        },
        "providers": [
            {
                "role": offer.role,
                "address": devnet.accounts[offer.role].address,
                "layers": offer.layers,
                "pricePerMillion": str(offer.price),
                "endpoint": launch.endpoint,
                "stake": str(min_stake),
                "pid": child.pid,
                "log": str(child.log),
            }
            for offer, launch, child in zip(offers, launches, providers, strict=True)
        ],
        "worker": {"pid": worker.pid, "log": str(worker.log)},
        "validator": {"pid": validator.pid, "log": str(validator.log)},
        "anvil": {"pid": anvil.pid, "log": str(anvil.log)},
        "redis": {"pid": redis_pid},  # None when REDIS_URL names a Redis of the user's
        "logs": str(supervisor.log_dir),
        "accounts": {
            role: {
                "address": account.address,
                "key": key_hex(account),
                "key_file": str(devnet.key_file(role)),
            }
            for role, account in devnet.accounts.items()
        },
        "development_keys": True,  # anvil's well-known keys: never use them on a real network
    }
    return summary, devnet


def prepare_database(url: str, *, embedded: Path | None, out: Console) -> None:
    """Migrates the database. The chain `strata up` starts is a new one, so the ledger must be too: the embedded
    SQLite file is replaced, and a database named by DATABASE_URL must hold no jobs, channels or epochs."""
    if embedded is not None:
        for suffix in ("", "-wal", "-shm"):
            embedded.with_name(embedded.name + suffix).unlink(missing_ok=True)
    try:
        with step(out, f"Migrating {url}…"):
            migrate(url)
        if embedded is not None:
            return
        engine = create_blocking_engine(url)
        try:
            with engine.connect() as connection:
                used = [
                    table.__tablename__
                    for table in (Job, Channel, Epoch)
                    if connection.scalar(select(func.count()).select_from(table))
                ]
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        raise ServiceFailed(f"the database cannot be used: {exc}", "database_unavailable") from exc
    if used:
        raise ServiceFailed(
            f"the database at DATABASE_URL already holds {', '.join(used)} of an earlier chain, and "
            "`strata up` starts a new one: point DATABASE_URL at an empty database",
            "database_not_empty",
        )


def check_redis(url: str) -> None:
    """Fails at once, rather than after the worker has retried for minutes, when REDIS_URL does not answer."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        with client:
            client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise ServiceFailed(f"the Redis at REDIS_URL does not answer: {exc}", "broker_unavailable") from exc


def stake_providers(devnet: Devnet, roles: list[str], out: Console) -> int:
    """Bonds the minimum stake for each role not yet holding it; returns the minimum."""
    stake = devnet.contracts.stake
    amount = stake.min_stake()
    with step(out, f"Staking {Decimal(amount) / ONE_TOKEN:,} sUSD for each provider…"):
        for role in roles:
            account = devnet.accounts[role]
            if stake.stake_of(account.address).staked < amount:
                bond(devnet.contracts, account, amount)
    return amount


def spawn_provider(
    supervisor: Supervisor, name: str, launch: ProviderLaunch, key: str, env: dict[str, str]
) -> Service:
    # One thread each: three providers share this machine's cores, and a tiny model gains nothing from more.
    child_env = {**env, "PROVIDER_KEY": key, "OMP_NUM_THREADS": "1"}
    return supervisor.spawn(name, launch.command(), env=child_env, tier=TIER_USERS)


def worker_environments(
    devnet: Devnet, common_env: dict[str, str], models: str, options: Options
) -> tuple[dict[str, str], dict[str, str]]:
    """The settlement worker's environment and the validator's: each holds its own key and not the other's, so
    that a compromised validator (which runs models on providers' data) cannot redeem vouchers or post roots, and
    the operator's worker cannot slash."""
    shared = {
        **without_keys(common_env),
        "MODELS": models,
        "SAMPLE_RATE": str(options.sample_rate),
        "EPOCH_S": str(options.epoch_s),
    }
    worker_env = {
        **shared,
        "OPERATOR_KEY": key_hex(devnet.accounts["operator"]),
        # It samples hops for the validator it does not hold the key of.
        "VALIDATOR_ADDRESS": devnet.accounts["validator"].address,
    }
    validator_env = {**shared, "VALIDATOR_KEY": key_hex(devnet.accounts["validator"])}
    return worker_env, validator_env


def worker_command(state: Path) -> list[str]:
    """The operator's worker: metering and epochs (with beat, which schedules them), not validation."""
    return [
        script("celery"), "-A", WORKER_APP, "worker", "-B",
        "--loglevel=INFO",
        "--concurrency", "1",
        "-Q", SETTLEMENT_QUEUE,
        "-n", "settlement@%h",
        "--schedule", str(state / "celerybeat-schedule"),
    ]  # fmt: skip


def validator_command() -> list[str]:
    """The validator's worker: only validate_hop, from its own queue."""
    return [
        script("celery"), "-A", WORKER_APP, "worker",
        "--loglevel=INFO",
        "--concurrency", "1",
        "-Q", VALIDATION_QUEUE,
        "-n", "validator@%h",
    ]  # fmt: skip


def celery_ready(line: str) -> bool:
    return line.rstrip().endswith(" ready.")


def gateway_health(url: str) -> dict[str, Any] | None:
    try:
        response = httpx.get(f"{url}/health", timeout=2.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    body: dict[str, Any] = response.json()
    return body


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False
