"""A local anvil chain, the embedded default when no RPC_URL is given."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from settlement.errors import ChainUnavailable, ConfigurationError
from settlement.solidity import PROJECT_ROOT


def anvil_binary(root: Path = PROJECT_ROOT) -> Path:
    local = root / "node_modules" / ".bin" / "anvil"
    if local.exists():
        return local
    found = shutil.which("anvil")
    if found:
        return Path(found)
    raise ConfigurationError(f"anvil not found in {local.parent} or on PATH: run `npm ci` (or `make`)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def terminate(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Stops a local service process: SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Anvil:
    """An anvil process on loopback; its prefunded dev accounts are in :attr:`accounts`.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        chain_id: int = 31337,
        accounts: int = 10,
        balance_ether: int = 10_000,
        block_time_s: float | None = None,
        startup_timeout_s: float = 30.0,
    ) -> None:
        self.port = port or free_port()
        self.chain_id = chain_id
        self.accounts_count = accounts
        self.balance_ether = balance_ether
        self.block_time_s = block_time_s
        self.startup_timeout_s = startup_timeout_s
        self.accounts: list[LocalAccount] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Anvil:
        self._workdir = tempfile.TemporaryDirectory(prefix="strata-anvil-")
        config_out = Path(self._workdir.name) / "anvil.json"
        command = [
            str(anvil_binary()),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--chain-id", str(self.chain_id),
            "--accounts", str(self.accounts_count),
            "--balance", str(self.balance_ether),
            "--config-out", str(config_out),
        ]  # fmt: skip
        if self.block_time_s is not None:
            command += ["--block-time", str(self.block_time_s)]
        self.log_path = Path(self._workdir.name) / "anvil.log"
        with self.log_path.open("wb") as log:
            # A session of its own: a Ctrl-C at the terminal goes to whoever started anvil, which stops it last.
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_ready(config_out)
        keys = json.loads(config_out.read_text())["private_keys"]
        self.accounts = [Account.from_key(key) for key in keys]
        return self

    def _wait_ready(self, config_out: Path) -> None:
        w3 = Web3(
            Web3.HTTPProvider(self.url, request_kwargs={"timeout": 1}, exception_retry_configuration=None)
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ChainUnavailable(
                    f"anvil exited with code {self._process.returncode} on port {self.port}"
                )
            try:
                if config_out.exists() and w3.eth.chain_id == self.chain_id:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet
            time.sleep(0.05)
        self.stop()
        raise ChainUnavailable(f"anvil did not answer on {self.url} within {self.startup_timeout_s:.0f} s")

    def stop(self) -> None:
        if self._process is not None:
            terminate(self._process)
        self._process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def wait(self) -> int:
        """Blocks until anvil exits (for foreground use); returns its exit code."""
        if self._process is None:
            return 0
        return self._process.wait()

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
