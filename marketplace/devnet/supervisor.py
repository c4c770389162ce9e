"""The process supervisor behind `strata up`: children in sessions of their own with their output in
``logs/<name>.log``, waited on until ready, restarted when they die, and stopped in order.

Every child runs in a session of its own, so a Ctrl-C at the terminal reaches only the supervising process,
which stops them from the highest tier down: whoever uses a service goes before it.

A service that dies once everything is up is started again, the same way, after a back-off that doubles with
each death in a row (1 s, 2 s, 4 s … at most 30 s) and starts over once it has run for a minute; each death
and each restart is reported. Whatever used the service rides it out as it would a network fault: providers
re-announce themselves, the gateway fails a route over or refuses with ``no_route`` meanwhile, Celery reconnects
to its broker, and an epoch meters and validates whatever a lost broker message left behind. During start-up a
death is fatal instead: something that cannot start once will not start on a loop either.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import NoReturn, Protocol

from rich.console import Console

from marketplace.devnet.errors import ServiceFailed
from marketplace.devnet.process import LocalProcess, spawn_logged

# Services are stopped from the highest tier down: whoever uses a service goes before it.
TIER_CHAIN, TIER_BROKER, TIER_GATEWAY, TIER_USERS = 0, 1, 2, 3

STARTUP_TIMEOUT_S = 180.0  # for each service to report ready; providers load weights, the gateway hashes
STOP_TIMEOUT_S = 20.0  # a child's grace after SIGTERM before it is killed


class Interrupted(BaseException):
    """SIGINT or SIGTERM: stop everything and leave with status 0."""


@dataclass(frozen=True)
class Backoff:
    """How long to wait before restarting a service that died: ``first_s``, doubled for each death in a row, at
    most ``max_s``; a service that ran ``steady_s`` before dying starts the count over."""

    first_s: float = 1.0
    max_s: float = 30.0
    steady_s: float = 60.0

    def delay(self, deaths_in_a_row: int) -> float:
        return min(self.max_s, self.first_s * 2.0 ** max(0, deaths_in_a_row - 1))


class Handle(Protocol):
    """One run of a service."""

    @property
    def pid(self) -> int | None: ...

    def alive(self) -> bool: ...

    def exit_code(self) -> int | None: ...

    def terminate(self) -> None:
        """Asks it to stop; returns at once (or once stopped, for local services)."""

    def wait(self, timeout_s: float) -> None:
        """Waits up to ``timeout_s`` for it to exit, then kills it."""


class _Child:
    """A child process the supervisor started; it leads a process group of its own."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def exit_code(self) -> int | None:
        return self.process.poll()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> None:
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # Whatever the child left behind (a Celery pool or beat process, say) goes with it.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


class _Local:
    """A local service (anvil, redis-server) that a class of its own started and stops."""

    def __init__(self, local: LocalProcess) -> None:
        self.local = local
        self.exited = threading.Event()
        threading.Thread(target=self._follow, name=f"{local.name}-watch", daemon=True).start()

    def _follow(self) -> None:
        self.local.wait()
        self.exited.set()

    @property
    def pid(self) -> int | None:
        return self.local.pid

    def alive(self) -> bool:
        return not self.exited.is_set() and self.local.running()

    def exit_code(self) -> int | None:
        return self.local.exit_code()

    def terminate(self) -> None:
        self.local.stop()

    def wait(self, timeout_s: float) -> None:
        return None  # terminate() waited already


@dataclass
class Service:
    """One thing the supervisor owns, and how to start it again."""

    name: str
    tier: int  # stopped from the highest tier down; equal tiers together
    start: Callable[[], Handle]
    handle: Handle
    log: Path | None = None
    started_at: float = field(default_factory=time.monotonic)
    deaths_in_a_row: int = 0
    restart_at: float | None = None  # when a restart is due, once its death was noticed

    @property
    def pid(self) -> int | None:
        return self.handle.pid

    def alive(self) -> bool:
        return self.handle.alive()

    def exit_code(self) -> int | None:
        return self.handle.exit_code()


class Supervisor:
    """Starts child processes and adopts local services; restarts them when they die (see :meth:`supervise`);
    stops them all."""

    def __init__(
        self,
        log_dir: Path,
        *,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        backoff: Backoff = Backoff(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log_dir = log_dir
        self.stop_timeout_s = stop_timeout_s
        self.backoff = backoff
        self.clock = clock
        self.services: list[Service] = []

    def spawn(self, name: str, command: list[str], *, env: dict[str, str], tier: int) -> Service:
        log_path = self.log_dir / f"{name}.log"
        runs = 0

        def start() -> Handle:
            nonlocal runs
            runs += 1
            # A restarted child appends to the log its last run wrote, so the reason it died stays there.
            return _Child(spawn_logged(command, log_path, env=env, append=runs > 1))

        return self._add(Service(name, tier, start, start(), log_path, started_at=self.clock()))

    def adopt(self, name: str, local: LocalProcess, *, tier: int) -> Service:
        """Supervises a local service that is already running (anvil, redis-server)."""

        def start() -> Handle:
            local.stop()  # what is left of the run that died: its temporary directory
            local.start()
            return _Local(local)

        return self._add(Service(name, tier, start, _Local(local), local.log_path, started_at=self.clock()))

    def _add(self, service: Service) -> Service:
        self.services.append(service)
        return service

    def dead(self) -> Service | None:
        return next((service for service in self.services if not service.alive()), None)

    def wait_until(
        self, what: str, check: Callable[[], bool], *, timeout_s: float = STARTUP_TIMEOUT_S
    ) -> None:
        """Polls ``check`` until it holds; fails at once if any service dies meanwhile (start-up)."""
        deadline = time.monotonic() + timeout_s
        while True:
            dead = self.dead()
            if dead is not None:
                raise died(dead, "during start-up")
            if check():
                return
            if time.monotonic() > deadline:
                raise ServiceFailed(f"{what} not ready within {timeout_s:.0f} s", "startup_timeout")
            time.sleep(0.2)

    def supervise(self, report: Callable[[str], object], *, every_s: float = 0.5) -> NoReturn:
        """Keeps every service running until interrupted: restarts each that dies, after its back-off."""
        while True:
            self.check(report)
            time.sleep(every_s)

    def check(self, report: Callable[[str], object]) -> None:
        """One round of supervision: notices deaths, and restarts whatever is due."""
        now = self.clock()
        for service in self.services:
            if service.alive():
                continue
            if service.restart_at is None:
                ran_s = now - service.started_at
                service.deaths_in_a_row = 1 if ran_s >= self.backoff.steady_s else service.deaths_in_a_row + 1
                delay = self.backoff.delay(service.deaths_in_a_row)
                service.restart_at = now + delay
                report(f"{describe_exit(service)} after {ran_s:.0f} s; restarting it in {delay:g} s")
                continue
            if now < service.restart_at:
                continue
            service.handle.wait(0)  # reap what is left of the last run
            try:
                service.handle = service.start()
            except Exception as exc:
                service.deaths_in_a_row += 1
                delay = self.backoff.delay(service.deaths_in_a_row)
                service.restart_at = now + delay
                report(f"{service.name} did not start again ({exc}); trying again in {delay:g} s")
                continue
            service.started_at, service.restart_at = self.clock(), None
            report(f"{service.name} restarted (pid {service.pid})")

    def stop_all(self) -> None:
        for tier in sorted({service.tier for service in self.services}, reverse=True):
            group = [service for service in self.services if service.tier == tier]
            for service in group:
                service.handle.terminate()
            for service in group:
                service.handle.wait(self.stop_timeout_s)
        self.services.clear()


def describe_exit(service: Service) -> str:
    code = service.exit_code()
    if code is None:
        return f"{service.name} exited"
    return (
        f"{service.name} was killed by {signal.Signals(-code).name}"
        if code < 0
        else (f"{service.name} exited with code {code}")
    )


def died(service: Service, when: str) -> ServiceFailed:
    where = f"; its log is {service.log}" if service.log else ""
    return ServiceFailed(f"{describe_exit(service)} {when}{where}", "service_exited", service.log)


def log_has_line(path: Path | None, predicate: Callable[[str], bool]) -> Callable[[], bool]:
    """A readiness check: ``path`` holds a line for which ``predicate`` is true."""

    def check() -> bool:
        if path is None or not path.exists():
            return False
        return any(predicate(line) for line in path.read_text(errors="replace").splitlines())

    return check


@contextmanager
def step(out: Console, message: str) -> Iterator[None]:
    """A spinner while ``message`` is under way, then a line saying how long it took (a log sees the line)."""
    started = time.monotonic()
    with out.status(message):
        yield
    out.print(
        f"[green]✓[/] {message.rstrip('…')} [dim]({time.monotonic() - started:.1f} s)[/]", highlight=False
    )


@contextmanager
def stop_on_signals() -> Iterator[Callable[[], None]]:
    """SIGINT and SIGTERM raise :class:`Interrupted` once; later ones, and any after the ``ignore`` this
    yields is called, are ignored while everything stops. SIGINT is handled even where it was ignored from
    the start (a shell's background job), so that ``kill -INT`` stops a backgrounded `strata up` too."""
    received = False

    def handler(_signum: int, _frame: FrameType | None) -> None:
        nonlocal received
        if not received:
            received = True
            raise Interrupted

    def ignore() -> None:
        nonlocal received
        received = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield ignore
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)
