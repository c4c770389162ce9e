"""Provider nodes as local processes: the `strata provider serve` command line for a span, as `strata up`, the
tests and the benchmarks start them, and the console scripts they run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from marketplace.devnet.errors import ServiceFailed
from marketplace.devnet.process import spawn_logged, terminate, wait_for_line
from worker.tls import NO_FINGERPRINT, TlsIdentity


def script(name: str) -> str:
    """A console script installed beside this Python (the venv's ``strata``, ``celery``), else one on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise ServiceFailed(
            f"`{name}` is not installed beside {sys.executable}: run `make install`", "not_installed"
        )
    return found


@dataclass(frozen=True)
class ProviderLaunch:
    """What `strata provider serve` is started with. The key goes in the environment (``PROVIDER_KEY``)."""

    model: Path
    layers: str  # "start:end"
    port: int
    trust_gateway: str  # the address whose job tickets it honours
    deployment: Path  # the deployment file: its chain and StakeManager name the protocol's signing domain
    tls_dir: Path | None  # where its TLS key and certificate are made and kept; None serves plain TCP
    retained_dir: Path | None = None  # where it keeps steps for validators [default: the node's]
    host: str = "127.0.0.1"
    gateway_url: str | None = None  # announce to this gateway at ``price``
    price: int | None = None
    extra: tuple[str, ...] = ()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        command = [
            script("strata"), "provider", "serve",
            "--model", str(self.model),
            "--layers", self.layers,
            "--host", self.host,
            "--port", str(self.port),
            "--trust-gateway", self.trust_gateway,
            "--deployment", str(self.deployment),
        ]  # fmt: skip
        command += ["--tls-dir", str(self.tls_dir)] if self.tls_dir is not None else ["--plaintext"]
        if self.retained_dir is not None:
            command += ["--retained-dir", str(self.retained_dir)]
        if self.gateway_url is not None:
            command += ["--gateway", self.gateway_url]
        if self.price is not None:
            command += ["--price", str(self.price)]
        return [*command, *self.extra]


@dataclass
class ProviderProcess:
    """A provider node started as a process of its own, its output in ``log``."""

    launch: ProviderLaunch
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls,
        launch: ProviderLaunch,
        *,
        key: str,
        log: Path,
        env: dict[str, str] | None = None,
        threads: int = 1,
    ) -> ProviderProcess:
        """Starts the node with ``key`` as PROVIDER_KEY and ``threads`` torch threads (several providers on one
        machine share its cores)."""
        child_env = {**(env or os.environ), "PROVIDER_KEY": key, "OMP_NUM_THREADS": str(threads)}
        if launch.tls_dir is not None:
            TlsIdentity.load_or_create(
                launch.tls_dir
            )  # made here, so the caller knows its fingerprint at once
        return cls(launch, spawn_logged(launch.command(), log, env=child_env), log)

    @property
    def endpoint(self) -> str:
        return self.launch.endpoint

    @property
    def fingerprint(self) -> bytes:
        """The certificate's fingerprint its asks name (made before the node starts, which then loads it); zero
        for a plaintext node."""
        if self.launch.tls_dir is None:
            return NO_FINGERPRINT
        return TlsIdentity.load_or_create(self.launch.tls_dir).fingerprint

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Blocks until the node printed ``ready``; fails with its log's tail if it exits first."""
        wait_for_line(self.process, self.log, timeout_s=timeout_s, name=f"provider {self.launch.layers}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 30.0) -> None:
        terminate(self.process, timeout_s)
