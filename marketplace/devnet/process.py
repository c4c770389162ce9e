"""Local service processes: a free port, a process started in a session of its own with its output in a log,
waited on until it answers, and stopped (SIGTERM, then SIGKILL).

:class:`LocalProcess` is what the embedded defaults have in common (anvil, redis-server); each says how it is
started and how to tell it is ready. :func:`wait_for_line` is how anything that prints ``ready`` (a provider
node) is waited for, by `strata up`, the tests and the benchmarks alike.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from marketplace.devnet.errors import ServiceFailed
from settlement.config import PROJECT_ROOT
from settlement.errors import ConfigurationError

LOG_TAIL_LINES = 20


def foundry_tool(name: str, root: Path = PROJECT_ROOT) -> Path:
    """``forge`` or ``anvil``: the binary of the npm package for this platform, else one on PATH. Not the
    launcher in node_modules/.bin, which does not pass the tool's exit status on (a failed build exits 0)."""
    for binary in sorted((root / "node_modules" / "@foundry-rs").glob(f"{name}-*/bin/{name}")):
        if os.access(binary, os.X_OK):
            return binary
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ConfigurationError(
        f"{name} not found under {root / 'node_modules'} or on PATH: run `npm ci` (or `make`)"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def terminate(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Stops a process: SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def spawn_logged(
    command: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None, append: bool = False
) -> subprocess.Popen[bytes]:
    """Starts ``command`` with stdout and stderr in ``log_path`` (after what it holds, with ``append``), in a
    session of its own: a Ctrl-C at the terminal reaches only whoever started it, which stops it in its own
    order."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab" if append else "wb") as log:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def printed(log_path: Path, line: str = "ready") -> Callable[[], bool]:
    """A readiness check: the log holds a line that is exactly ``line`` (a provider node prints ``ready``)."""

    def check() -> bool:
        if not log_path.exists():
            return False
        return line in (text.strip() for text in log_path.read_text(errors="replace").splitlines())

    return check


def wait_for_line(
    process: subprocess.Popen[bytes],
    log_path: Path,
    *,
    line: str = "ready",
    timeout_s: float = 300.0,
    name: str = "",
) -> None:
    """Blocks until ``log_path`` holds a line that is exactly ``line``. Fails with the log's tail when the
    process exits first or ``timeout_s`` passes."""
    name = name or Path(str(process.args[0] if isinstance(process.args, list) else process.args)).name
    ready = printed(log_path, line)
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise ServiceFailed(
                f"{name} exited with code {process.returncode} before it was ready:\n{log_tail(log_path)}",
                "service_exited",
                log_path,
            )
        if time.monotonic() > deadline:
            raise ServiceFailed(
                f"{name} not ready within {timeout_s:.0f} s:\n{log_tail(log_path)}",
                "startup_timeout",
                log_path,
            )
        time.sleep(0.05)


class LocalProcess:
    """One local service process on loopback, in a temporary directory of its own that goes when it stops.

    Subclasses give :meth:`command` and :meth:`ready`; :meth:`start` runs the command and polls ``ready``
    until it holds, the process exits, or ``startup_timeout_s`` passes. Use as a context manager, or call
    :meth:`start` and :meth:`stop`.
    """

    name = "process"

    def __init__(
        self, *, port: int | None = None, log_path: Path | None = None, startup_timeout_s: float = 30.0
    ) -> None:
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self._requested_log = log_path  # None: a file in the temporary directory
        self.log_path: Path | None = None
        self.workdir: Path | None = None
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._started = False

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def unavailable(self, message: str) -> Exception:
        """The error a failed start raises."""
        return ServiceFailed(message, "service_exited", self.log_path)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> Self:
        self._tempdir = tempfile.TemporaryDirectory(prefix=f"strata-{self.name}-")
        self.workdir = Path(self._tempdir.name)
        self.log_path = self._requested_log or self.workdir / f"{self.name}.log"
        try:
            # A restart appends to the log of the run before, so the reason that one died stays there.
            self._process = spawn_logged(self.command(), self.log_path, append=self._started)
            self._started = True
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise self.unavailable(
                    f"{self.name} exited with code {self._process.returncode} on port {self.port}: "
                    + " | ".join(log_tail(self.log_path, 5).splitlines())
                )
            if self.ready():
                return
            time.sleep(0.05)
        raise self.unavailable(
            f"{self.name} did not answer on port {self.port} within {self.startup_timeout_s:.0f} s"
        )

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def exit_code(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def wait(self) -> int:
        """Blocks until the process exits (for foreground use); returns its exit code."""
        return 0 if self._process is None else self._process.wait()

    def stop(self) -> None:
        if self._process is not None:
            terminate(self._process)
        self._process = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
