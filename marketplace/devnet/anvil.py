"""A local anvil chain, the embedded default when no RPC_URL is given."""

from __future__ import annotations

import json
from pathlib import Path

import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from marketplace.devnet.process import LocalProcess, foundry_tool
from settlement.errors import ChainUnavailable


class Anvil(LocalProcess):
    """An anvil process on loopback; its prefunded dev accounts are in :attr:`accounts` once started."""

    name = "anvil"

    def __init__(
        self,
        *,
        port: int | None = None,
        chain_id: int = 31337,
        accounts: int = 10,
        balance_ether: int = 10_000,
        block_time_s: float | None = None,
        state_path: Path | None = None,
        log_path: Path | None = None,
        startup_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(port=port, log_path=log_path, startup_timeout_s=startup_timeout_s)
        # Where the chain is dumped every second and loaded from when it starts again: a restarted anvil goes
        # on from there, losing at most the last second. None: every start is a new chain.
        self.state_path = state_path
        self.chain_id = chain_id
        self.accounts_count = accounts
        self.balance_ether = balance_ether
        self.block_time_s = block_time_s
        self.accounts: list[LocalAccount] = []
        self._w3 = Web3(
            Web3.HTTPProvider(self.url, request_kwargs={"timeout": 1}, exception_retry_configuration=None)
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def _config_out(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "anvil.json"

    def command(self) -> list[str]:
        command = [
            str(foundry_tool("anvil")),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--chain-id", str(self.chain_id),
            "--accounts", str(self.accounts_count),
            "--balance", str(self.balance_ether),
            "--config-out", str(self._config_out),
        ]  # fmt: skip
        if self.block_time_s is not None:
            command += ["--block-time", str(self.block_time_s)]
        if self.state_path is not None:
            command += ["--state", str(self.state_path), "--state-interval", "1"]
        return command

    def ready(self) -> bool:
        try:
            if not (self._config_out.exists() and self._w3.eth.chain_id == self.chain_id):
                return False
        except (requests.ConnectionError, requests.Timeout):
            return False  # not listening yet
        keys = json.loads(self._config_out.read_text())["private_keys"]
        self.accounts = [Account.from_key(key) for key in keys]
        return True

    def unavailable(self, message: str) -> Exception:
        return ChainUnavailable(message)
