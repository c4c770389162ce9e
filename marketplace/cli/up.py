"""`strata up`: the whole marketplace on this machine, in the foreground, until Ctrl-C.

What it runs:

    anvil          the chain on --chain-port: contracts deployed, one dev account per role, demo accounts funded
    redis-server   Celery's broker and result backend, unless REDIS_URL names a Redis
    (database)     SQLite under the state directory unless DATABASE_URL names one; migrated to the newest schema
    gateway        `strata gateway serve` on --port, with the devnet's gateway key, which providers trust; the
                   exact payments it takes go to the operator, who forwards them at settlement
    provider-1..3  `strata provider serve`, each staked with the minimum stake, serving a third of the layers
                   of a tiny local model at its own price, announced to the gateway
    cheater-N      with --cheaters N: staked like the others, serving the N-th third dishonestly (--cheat) 10%
                   cheaper than the honest provider, so that it is routed to until a validator slashes it
    worker         `celery -A settlement.tasks worker -B`: metering, an epoch closed every --epoch-seconds, and
                   the validator (the devnet's validator key) re-executing --sample-rate of the billed hops

Ctrl-C or SIGTERM stops them all, the processes that use a service before the service: providers and worker
(providers withdraw their asks from the gateway as they go), then the gateway, then Redis, then the chain. The
children run in sessions of their own, so a Ctrl-C at the terminal reaches only `strata up`, which stops them in
that order. If any of them dies, at start-up or later, everything is stopped, the
tail of its log printed, and the exit status is 1 (code ``service_exited``).

Everything it writes is under the state directory (``.strata``): ``deployment.json``; ``devnet.json``, the
accounts with their development keys and every service's URL, which `strata demo` reads; ``models/tiny``;
``logs/<name>.log`` for each process it starts; the beat schedule; and the SQLite database.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import httpx
import redis
import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from marketplace.cli.chain import Devnet, accounts_table, key_hex, start_devnet
from marketplace.cli.common import console, errors, fail, reported, tokens
from settlement.anvil import free_port
from settlement.config import SettlementSettings
from settlement.db.engine import create_blocking_engine, migrate
from settlement.db.schema import Channel, Epoch, Job
from settlement.deploy import DeployParams
from settlement.redis_server import RedisServer

MODEL_NAME = "tiny"


@dataclass(frozen=True)
class TinyModel:
    """The demo model: small enough that three CPU processes serve it in real time."""

    arch: str = "llama"
    layers: int = 6
    hidden: int = 128  # hidden size; two attention heads of 64
    seed: int = 3  # of the random initialisation, so every build has the same weights and root


TINY_MODEL = TinyModel()
TINY_MARKER = "strata-tiny.json"  # the config a checkpoint was built with, to know when to rebuild it
# Base units of the token per million token-layers: 100, 150 and 200 base units per token-layer, so a
# token through all six layers costs 900 base units (0.0009 sUSD).
PROVIDER_PRICES = (100_000_000, 150_000_000, 200_000_000)
PROVIDER_ROLES = ("provider-1", "provider-2", "provider-3")
# --cheaters: cheater-N serves the N-th span dishonestly, 10% under the honest price so that it wins the work.
CHEATER_ROLES = ("cheater-1", "cheater-2", "cheater-3")
CHEATER_DISCOUNT = 0.9
WORKER_APP = "settlement.tasks"

# Services are stopped from the highest tier down: whoever uses a service goes before it.
TIER_CHAIN, TIER_BROKER, TIER_GATEWAY, TIER_USERS = 0, 1, 2, 3

STARTUP_TIMEOUT_S = 180.0  # for each service to report ready; providers load weights, the gateway hashes
STOP_TIMEOUT_S = 20.0  # a child's grace after SIGTERM before it is killed
LOG_TAIL_LINES = 20


class UpFailed(Exception):
    """A service did not start, or died; ``log`` is where it said why."""

    def __init__(self, message: str, code: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.log = log


class Interrupted(BaseException):
    """SIGINT or SIGTERM: stop everything and leave with status 0."""


# -- child processes ---------------------------------------------------------------------------------------


@dataclass
class Service:
    """One running thing `strata up` owns: a child process, or a service started by a class of its own."""

    name: str
    tier: int  # stopped from the highest tier down; equal tiers together
    alive: Callable[[], bool]
    terminate: Callable[[], None]  # asks it to stop, returns at once (or when stopped, for adopted ones)
    wait: Callable[[float], None]  # waits up to the given seconds, then kills
    log: Path | None = None
    pid: int | None = None
    exit_code: Callable[[], int | None] = field(default=lambda: None)


class Supervisor:
    """Starts child processes, each in a session of its own (Ctrl-C at the terminal reaches only `strata up`,
    which stops them in order) with its output in ``logs/<name>.log``; notices when one dies; stops them all."""

    def __init__(self, log_dir: Path, *, stop_timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.log_dir = log_dir
        self.stop_timeout_s = stop_timeout_s
        self.services: list[Service] = []

    def spawn(self, name: str, command: list[str], *, env: dict[str, str], tier: int) -> Service:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        service = Service(
            name,
            tier,
            alive=lambda: process.poll() is None,
            terminate=lambda: _signal(process, signal.SIGTERM),
            wait=lambda timeout_s: _reap(process, timeout_s),
            log=log_path,
            pid=process.pid,
            exit_code=process.poll,
        )
        self.services.append(service)
        return service

    def adopt(self, service: Service) -> Service:
        self.services.append(service)
        return service

    def dead(self) -> Service | None:
        return next((service for service in self.services if not service.alive()), None)

    def watch(self, every_s: float = 0.5) -> Service:
        """Blocks until a service dies; returns it."""
        while True:
            dead = self.dead()
            if dead is not None:
                return dead
            time.sleep(every_s)

    def stop_all(self) -> None:
        for tier in sorted({service.tier for service in self.services}, reverse=True):
            group = [service for service in self.services if service.tier == tier]
            for service in group:
                service.terminate()
            for service in group:
                service.wait(self.stop_timeout_s)
        self.services.clear()


def _signal(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if process.poll() is None:
        process.send_signal(sig)


def _reap(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    # The child led a process group of its own: whatever it left behind (a Celery pool or beat process, say)
    # goes with it.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _adopt_anvil(supervisor: Supervisor, devnet: Devnet) -> None:
    exited = threading.Event()

    def follow() -> None:
        devnet.anvil.wait()
        exited.set()

    threading.Thread(target=follow, name="anvil-watch", daemon=True).start()
    supervisor.adopt(
        Service(
            "anvil",
            tier=TIER_CHAIN,
            alive=lambda: not exited.is_set(),
            terminate=devnet.anvil.stop,
            wait=lambda _timeout_s: None,
            log=devnet.anvil.log_path,
        )
    )


def _adopt_redis(supervisor: Supervisor, server: RedisServer) -> None:
    supervisor.adopt(
        Service(
            "redis",
            tier=TIER_BROKER,
            alive=server.running,
            terminate=server.stop,
            wait=lambda _timeout_s: None,
            log=server.log_path,
            pid=server.pid,
        )
    )


# -- waiting for readiness ---------------------------------------------------------------------------------


@contextmanager
def step(out: Console, message: str) -> Iterator[None]:
    """A spinner while ``message`` is under way, then a line saying how long it took (a log sees the line)."""
    started = time.monotonic()
    with out.status(message):
        yield
    out.print(
        f"[green]✓[/] {message.rstrip('…')} [dim]({time.monotonic() - started:.1f} s)[/]", highlight=False
    )


def wait_until(
    supervisor: Supervisor, what: str, check: Callable[[], bool], *, timeout_s: float = STARTUP_TIMEOUT_S
) -> None:
    """Polls ``check`` until it holds; fails at once if any service dies meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        dead = supervisor.dead()
        if dead is not None:
            raise _died(dead, "during start-up")
        if check():
            return
        if time.monotonic() > deadline:
            raise UpFailed(f"{what} not ready within {timeout_s:.0f} s", "startup_timeout")
        time.sleep(0.2)


def _died(service: Service, when: str) -> UpFailed:
    code = service.exit_code()
    status = ""
    if code is not None:
        status = f" (killed by {signal.Signals(-code).name})" if code < 0 else f" with code {code}"
    where = f"; its log is {service.log}" if service.log else ""
    return UpFailed(f"{service.name} exited{status} {when}{where}", "service_exited", service.log)


def _log_has_line(path: Path | None, predicate: Callable[[str], bool]) -> Callable[[], bool]:
    def check() -> bool:
        if path is None or not path.exists():
            return False
        return any(predicate(line) for line in path.read_text(errors="replace").splitlines())

    return check


def _gateway_health(url: str) -> dict[str, Any] | None:
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


# -- the pieces --------------------------------------------------------------------------------------------


def tiny_model(directory: Path, out: Console) -> Path:
    """The demo checkpoint, built once: reused while its marker says it was built from TINY_MODEL."""
    from worker.testing.tiny import write_tiny_checkpoint

    marker = directory / TINY_MARKER
    try:
        built = json.loads(marker.read_text())
        reusable = built == asdict(TINY_MODEL) and (directory / "config.json").is_file()
    except (OSError, ValueError):
        reusable = False
    if not reusable:
        with step(out, f"Building the tiny model in {directory}…"):
            shutil.rmtree(directory, ignore_errors=True)
            write_tiny_checkpoint(directory, **asdict(TINY_MODEL))
            marker.write_text(json.dumps(asdict(TINY_MODEL)) + "\n")
    return directory


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
        raise UpFailed(f"the database cannot be used: {exc}", "database_unavailable") from exc
    if used:
        raise UpFailed(
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
        raise UpFailed(f"the Redis at REDIS_URL does not answer: {exc}", "broker_unavailable") from exc


def _spans(layers: int, parts: int) -> list[tuple[int, int]]:
    """``layers`` split into ``parts`` contiguous spans, the later ones a layer longer when it does not divide."""
    bounds = [layers * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def _stake(devnet: Devnet, roles: tuple[str, ...], out: Console) -> int:
    stake = devnet.contracts.stake
    amount = stake.min_stake()
    with step(out, f"Staking {tokens(amount)} sUSD for each provider…"):
        for role in roles:
            account = devnet.accounts[role]
            if stake.stake_of(account.address).staked >= amount:
                continue
            devnet.contracts.token.approve(account, spender=stake.address, amount=amount)
            stake.stake(account, amount=amount)
    return amount


def _script(name: str) -> str:
    """A console script installed beside this Python (the venv's ``strata``, ``celery``), else one on PATH."""
    script = Path(sys.executable).with_name(name)
    found = str(script) if script.exists() else shutil.which(name)
    if found is None:
        raise UpFailed(
            f"`{name}` is not installed beside {sys.executable}: run `make install`", "not_installed"
        )
    return found


@contextmanager
def _stop_on_signals() -> Iterator[Callable[[], None]]:
    """SIGINT and SIGTERM raise :class:`Interrupted` once; later ones, and any after the ``ignore`` this
    yields is called, are ignored while everything stops."""
    received = False

    def handler(_signum: int, _frame: FrameType | None) -> None:
        nonlocal received
        if not received:
            received = True
            raise Interrupted

    def ignore() -> None:
        nonlocal received
        received = True

    # A SIGINT ignored from the start (a shell's background job) stays ignored, as Python itself leaves it.
    handled = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        handled.append(signal.SIGINT)
    previous = {sig: signal.signal(sig, handler) for sig in handled}
    try:
        yield ignore
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)


# -- the command -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    port: int
    chain_port: int
    epoch_s: float
    state_dir: Path
    params: DeployParams
    as_json: bool
    cheaters: int = 0
    cheat: str = "skip-layer"
    sample_rate: float = 1.0


def up_command(
    port: Annotated[int, typer.Option(min=1, max=65535, help="the gateway's port on 127.0.0.1")] = 8000,
    chain_port: Annotated[int, typer.Option(min=1, max=65535, help="anvil's port on 127.0.0.1")] = 8545,
    epoch_seconds: Annotated[
        float, typer.Option(min=1, help="seconds between the settlement worker's epoch closes")
    ] = 60.0,
    state_dir: Annotated[
        Path, typer.Option(help="where deployment, devnet accounts, model, logs and database go")
    ] = Path(".strata"),
    unbonding_period: Annotated[
        int | None, typer.Option(min=0, help="StakeManager's unbonding period, seconds [default: 7 days]")
    ] = None,
    cheaters: Annotated[
        int,
        typer.Option(
            min=0,
            max=len(CHEATER_ROLES),
            help="extra providers that cheat, undercutting the honest ones' prices",
        ),
    ] = 0,
    cheat: Annotated[
        str, typer.Option(help="how the cheaters cheat (see worker.testing.cheats)")
    ] = "skip-layer",
    sample_rate: Annotated[
        float, typer.Option(min=0, max=1, help="probability that the validator re-executes a billed hop")
    ] = 1.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the summary as one JSON line once ready, then keep running")
    ] = False,
) -> None:
    """Start the whole marketplace locally (chain, broker, database, gateway, three providers, settlement
    worker) and keep it running until Ctrl-C. Try it with `strata demo`."""
    if port == chain_port:
        raise typer.BadParameter("the gateway and the chain need different ports", param_hint="--port")
    for what, number in (("--port", port), ("--chain-port", chain_port)):
        if port_in_use(number):
            fail(f"port {number} ({what}) is already in use on 127.0.0.1", "port_in_use", as_json=as_json)
    from worker.testing.cheats import CHEATS

    if cheat not in CHEATS or cheat == "copy-input":
        kinds = ", ".join(kind for kind in CHEATS if kind != "copy-input")
        raise typer.BadParameter(f"{cheat!r} is not one of {kinds}", param_hint="--cheat")
    params = DeployParams() if unbonding_period is None else DeployParams(unbonding_period_s=unbonding_period)
    options = Options(
        port, chain_port, epoch_seconds, state_dir.resolve(), params, as_json, cheaters, cheat, sample_rate
    )
    # Progress and the human summary go to stderr under --json, so stdout carries only the JSON line.
    out = errors if as_json else console
    supervisor = Supervisor(options.state_dir / "logs")
    failure: UpFailed | None = None
    with _stop_on_signals() as ignore_signals:
        try:
            with reported(as_json=as_json):
                summary, devnet = _start(supervisor, options, out)
            _announce(summary, devnet, options, out)
            raise _died(supervisor.watch(), "while running")
        except Interrupted:
            out.print("Stopping…")
        except UpFailed as exc:
            failure = exc
            tail = log_tail(exc.log)
            if tail:
                errors.print(f"[dim]last lines of {exc.log}:[/]")
                errors.print(tail, markup=False, highlight=False, soft_wrap=True)
        finally:
            ignore_signals()  # a second Ctrl-C must not cut the stopping short
            supervisor.stop_all()
    if failure is not None:
        fail(str(failure), failure.code, as_json=as_json)
    out.print("Stopped.")


def _start(supervisor: Supervisor, options: Options, out: Console) -> tuple[dict[str, Any], Devnet]:
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
    )
    _adopt_anvil(supervisor, devnet)

    if settings.redis_url:
        redis_url = settings.redis_url
    else:
        server = RedisServer(log_path=supervisor.log_dir / "redis.log")
        with step(out, "Starting redis-server…"):
            server.start()
        _adopt_redis(supervisor, server)
        redis_url = server.url

    model_dir = tiny_model(state / "models" / MODEL_NAME, out)
    with step(out, "Hashing the model…"):
        from marketplace.catalog import load_model  # torch: imported only when a model is loaded

        model = load_model(model_dir, MODEL_NAME)  # writes the manifest before several processes would
    min_stake = _stake(devnet, (*PROVIDER_ROLES, *CHEATER_ROLES[: options.cheaters]), out)

    operator = devnet.accounts["operator"]
    common_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "RPC_URL": devnet.rpc_url,
        "DEPLOYMENT_FILE": str(devnet.deployment_file),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
    }
    strata = _script("strata")
    gateway_url = f"http://127.0.0.1:{options.port}"
    gateway = supervisor.spawn(
        "gateway",
        [strata, "gateway", "serve", "--host", "127.0.0.1", "--port", str(options.port)],
        env={
            **common_env,
            "GATEWAY_KEY": key_hex(devnet.accounts["gateway"]),
            "MODELS": json.dumps([f"{MODEL_NAME}={model_dir}"]),
        },
        tier=TIER_GATEWAY,
    )
    # The worker needs only the broker, the database and the chain: it starts while the gateway does.
    worker_env = {
        **common_env,
        "OPERATOR_KEY": key_hex(operator),
        "VALIDATOR_KEY": key_hex(devnet.accounts["validator"]),
        "MODELS": json.dumps([f"{MODEL_NAME}={model_dir}"]),
        "SAMPLE_RATE": str(options.sample_rate),
    }
    worker = _spawn_worker(supervisor, state, worker_env, options)
    with step(out, f"Starting the gateway on {gateway_url}…"):
        wait_until(supervisor, "the gateway", lambda: _gateway_health(gateway_url) is not None)

    # Providers announce themselves to the gateway as they start, so they start once it answers.
    offers = _offers(devnet, model.num_layers, options.cheaters)
    providers = _spawn_providers(
        supervisor, devnet, offers, model_dir, gateway_url, common_env, options.cheat
    )
    with step(out, f"Starting {len(providers)} providers…"):
        for provider in providers:
            wait_until(supervisor, provider.name, _log_has_line(provider.log, lambda line: line == "ready"))

        def announced() -> bool:
            health = _gateway_health(gateway_url)
            return health is not None and int(health.get("asks", 0)) >= len(providers)

        wait_until(supervisor, "the providers' asks", announced)
    with step(out, "Starting the settlement worker…"):
        wait_until(supervisor, "the settlement worker", _log_has_line(worker.log, _celery_ready))

    services = {
        "gateway_url": gateway_url,
        "redis_url": redis_url,
        "database_url": database_url,
        "model": {"name": MODEL_NAME, "root": model.root, "path": str(model_dir), "layers": model.num_layers},
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
            {**offer, "stake": str(min_stake), "pid": child.pid, "log": str(child.log)}
            for child, offer in zip(providers, offers, strict=True)
        ],
        "worker": {"pid": worker.pid, "log": str(worker.log)},
        "logs": str(supervisor.log_dir),
        "accounts": {
            role: {"address": account.address, "key": key_hex(account)}
            for role, account in devnet.accounts.items()
        },
        "development_keys": True,  # anvil's well-known keys: never use them on a real network
    }
    return summary, devnet


def _offers(devnet: Devnet, layers: int, cheaters: int = 0) -> list[dict[str, str]]:
    """Each demo provider's address, span, price and a free port to serve on; cheaters last."""
    spans = _spans(layers, len(PROVIDER_ROLES))
    honest = [
        (role, span, price) for role, span, price in zip(PROVIDER_ROLES, spans, PROVIDER_PRICES, strict=True)
    ]
    cheating = [
        (role, spans[i], int(PROVIDER_PRICES[i] * CHEATER_DISCOUNT))
        for i, role in enumerate(CHEATER_ROLES[:cheaters])
    ]
    return [
        {
            "role": role,
            "address": devnet.accounts[role].address,
            "layers": f"{start}:{end}",
            "pricePerMillion": str(price),
            "endpoint": f"127.0.0.1:{free_port()}",
        }
        for role, (start, end), price in [*honest, *cheating]
    ]


def _spawn_providers(
    supervisor: Supervisor,
    devnet: Devnet,
    offers: list[dict[str, str]],
    model_dir: Path,
    gateway_url: str,
    env: dict[str, str],
    cheat: str,
) -> list[Service]:
    gateway = devnet.accounts["gateway"]
    children = []
    for offer in offers:
        command = [
            _script("strata"), "provider", "serve",
            "--model", str(model_dir),
            "--layers", offer["layers"],
            "--host", "127.0.0.1",
            "--port", offer["endpoint"].rpartition(":")[2],
            "--trust-gateway", gateway.address,
            "--chain-id", str(devnet.chain_id),
            "--gateway", gateway_url,
            "--price", offer["pricePerMillion"],
        ]  # fmt: skip
        if offer["role"] in CHEATER_ROLES:
            command += ["--cheat", cheat]
        key = key_hex(devnet.accounts[offer["role"]])
        # One thread each: three providers share this machine's cores, and a tiny model gains nothing from more.
        child_env = {**env, "PROVIDER_KEY": key, "OMP_NUM_THREADS": "1"}
        children.append(supervisor.spawn(offer["role"], command, env=child_env, tier=TIER_USERS))
    return children


def _spawn_worker(supervisor: Supervisor, state: Path, env: dict[str, str], options: Options) -> Service:
    command = [
        _script("celery"), "-A", WORKER_APP, "worker", "-B",
        "--loglevel=INFO",
        "--concurrency", "1",
        "--schedule", str(state / "celerybeat-schedule"),
    ]  # fmt: skip
    return supervisor.spawn("worker", command, env={**env, "EPOCH_S": str(options.epoch_s)}, tier=TIER_USERS)


def _celery_ready(line: str) -> bool:
    return line.rstrip().endswith(" ready.")


def _announce(summary: dict[str, Any], devnet: Devnet, options: Options, out: Console) -> None:
    if options.as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        sys.stdout.flush()
    services = Table(title="Strata is up")
    for column in ("service", "where", "log"):
        services.add_column(column, overflow="fold")
    services.add_row("gateway", summary["gateway_url"], summary["gateway"]["log"])
    services.add_row("chain", f"{summary['rpc_url']} (chain id {summary['chain_id']})", "")
    services.add_row("redis", summary["redis_url"], "")
    services.add_row("database", summary["database_url"], "")
    for provider in summary["providers"]:
        services.add_row(
            f"{provider['role']} layers {provider['layers']}",
            f"{provider['endpoint']} at {int(provider['pricePerMillion']):,} per M token-layers",
            provider["log"],
        )
    services.add_row(
        "settlement worker",
        f"epoch every {options.epoch_s:g} s, validating {options.sample_rate:.0%} of hops",
        summary["worker"]["log"],
    )
    out.print(services)
    out.print(accounts_table(devnet))
    state = options.state_dir
    demo = "strata demo" if state == Path(".strata").resolve() else f"strata demo --state-dir {state}"
    out.print("[bold]Try it:[/]")
    out.print(f"  {demo}", highlight=False, soft_wrap=True)
    out.print(
        f"  curl -i {summary['gateway_url']}/v1/chat/completions -H 'content-type: application/json' "
        f'-d \'{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": "hello"}}], '
        '"max_tokens": 8}\'   [dim]# a 402 with the quote in PAYMENT-REQUIRED[/]',
        highlight=False,
        soft_wrap=True,
    )
    client_key = summary["accounts"]["client-1"]["key"]
    out.print(
        f"  export RPC_URL={summary['rpc_url']} DEPLOYMENT_FILE={summary['deployment_file']} "
        f"GATEWAY_URL={summary['gateway_url']} CLIENT_KEY={client_key}",
        highlight=False,
        soft_wrap=True,
    )
    out.print(
        f'  strata client deposit 10 && strata client ask "hello" --model {MODEL_NAME}',
        highlight=False,
        soft_wrap=True,
    )
    out.print("Press Ctrl-C to stop.")
