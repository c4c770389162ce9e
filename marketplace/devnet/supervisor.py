"""The process supervisor behind `strata up`: children in sessions of their own with their output in
``logs/<name>.log``, waited on until ready, watched while they run, and stopped in order.

Every child runs in a session of its own, so a Ctrl-C at the terminal reaches only the supervising process,
which stops them from the highest tier down: whoever uses a service goes before it.
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

from rich.console import Console

from marketplace.devnet.errors import ServiceFailed
from marketplace.devnet.process import LocalProcess, spawn_logged

# Services are stopped from the highest tier down: whoever uses a service goes before it.
TIER_CHAIN, TIER_BROKER, TIER_GATEWAY, TIER_USERS = 0, 1, 2, 3

STARTUP_TIMEOUT_S = 180.0  # for each service to report ready; providers load weights, the gateway hashes
STOP_TIMEOUT_S = 20.0  # a child's grace after SIGTERM before it is killed


class Interrupted(BaseException):
    """SIGINT or SIGTERM: stop everything and leave with status 0."""


@dataclass
class Service:
    """One running thing the supervisor owns: a child process, or a local service started by a class of its
    own (anvil, redis-server) and adopted."""

    name: str
    tier: int  # stopped from the highest tier down; equal tiers together
    alive: Callable[[], bool]
    terminate: Callable[[], None]  # asks it to stop, returns at once (or when stopped, for adopted ones)
    wait: Callable[[float], None]  # waits up to the given seconds, then kills
    log: Path | None = None
    pid: int | None = None
    exit_code: Callable[[], int | None] = field(default=lambda: None)


class Supervisor:
    """Starts child processes, notices when one dies, and stops them all."""

    def __init__(self, log_dir: Path, *, stop_timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.log_dir = log_dir
        self.stop_timeout_s = stop_timeout_s
        self.services: list[Service] = []

    def spawn(self, name: str, command: list[str], *, env: dict[str, str], tier: int) -> Service:
        log_path = self.log_dir / f"{name}.log"
        process = spawn_logged(command, log_path, env=env)
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

    def adopt(self, name: str, local: LocalProcess, *, tier: int) -> Service:
        """Supervises a local service that is already running (anvil, redis-server)."""
        exited = threading.Event()

        def follow() -> None:
            local.wait()
            exited.set()

        threading.Thread(target=follow, name=f"{name}-watch", daemon=True).start()
        service = Service(
            name,
            tier,
            alive=lambda: not exited.is_set() and local.running(),
            terminate=local.stop,
            wait=lambda _timeout_s: None,
            log=local.log_path,
            pid=local.pid,
        )
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

    def wait_until(
        self, what: str, check: Callable[[], bool], *, timeout_s: float = STARTUP_TIMEOUT_S
    ) -> None:
        """Polls ``check`` until it holds; fails at once if any service dies meanwhile."""
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


def died(service: Service, when: str) -> ServiceFailed:
    code = service.exit_code()
    status = ""
    if code is not None:
        status = f" (killed by {signal.Signals(-code).name})" if code < 0 else f" with code {code}"
    where = f"; its log is {service.log}" if service.log else ""
    return ServiceFailed(f"{service.name} exited{status} {when}{where}", "service_exited", service.log)


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
