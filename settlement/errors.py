"""Errors raised by the settlement layer.

    SettlementError                    every error below; carries a stable ``code``
    ├── ConfigurationError             missing or malformed settings, deployment files, keys
    │   ├── BadDatabaseURL             a database URL that is not SQLite or PostgreSQL
    │   └── ContractsNotBuilt          the contracts' build artifacts are missing: `make contracts`
    ├── CompilerError                  forge is missing, or the contracts do not compile
    ├── ChainError                     the chain could not be used as asked
    │   ├── ChainUnavailable           the JSON-RPC endpoint cannot be reached
    │   ├── ChainMismatch              the endpoint serves another chain than the deployment's
    │   ├── TransactionRejected        the endpoint refused a signed transaction (funds for gas, nonce, fees)
    │   ├── TransactionReverted        a call or transaction reverted; ``error`` is the decoded custom error
    │   └── TransactionTimeout         no receipt in time; the transaction may still land
    ├── MerkleError                    a tree or proof request that cannot be answered
    ├── UnknownJob                     metering or validation was asked for a job the database does not have
    ├── CannotJudge                    the validator cannot judge a drawn hop by its rules: nobody is blamed
    ├── EpochBusy                      another close_epoch holds the lock
    ├── BrokerUnavailable              the local redis-server did not start or does not answer
    └── LedgerMismatch                 the database and the chain disagree about settlement

The API edge turns these into HTTP errors by ``code``; nothing below it knows about HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class SettlementError(Exception):
    code = "settlement_error"


class ConfigurationError(SettlementError):
    code = "configuration_error"


class CannotJudge(SettlementError):
    """The validator cannot judge a hop it drew: parameters the gateway committed that its rules do not take.
    Nobody is blamed."""

    code = "cannot_judge"


class BadDatabaseURL(ConfigurationError):
    code = "bad_database_url"


class ContractsNotBuilt(ConfigurationError):
    code = "contracts_not_built"


class CompilerError(SettlementError):
    code = "compiler_error"


class ChainError(SettlementError):
    code = "chain_error"


class ChainUnavailable(ChainError):
    code = "chain_unavailable"


class ChainMismatch(ChainError):
    code = "chain_mismatch"


class TransactionRejected(ChainError):
    code = "transaction_rejected"

    def __init__(self, action: str, tx_hash: str, reason: str) -> None:
        self.action = action
        self.tx_hash = tx_hash
        self.reason = reason
        super().__init__(f"{action}: the endpoint refused transaction {tx_hash}: {reason}")


@dataclass(frozen=True)
class DecodedError:
    """A Solidity custom error (or ``Error(string)`` / ``Panic(uint256)``) with its arguments by name."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        inner = ", ".join(f"{key}={_short(value)}" for key, value in self.args.items())
        return f"{self.name}({inner})"


def _short(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)


class TransactionReverted(ChainError):
    """A reverted call or transaction. ``error`` is None when the revert data matched no known error."""

    code = "transaction_reverted"

    def __init__(
        self,
        action: str,
        error: DecodedError | None,
        *,
        tx_hash: str | None = None,
        raw: bytes = b"",
    ) -> None:
        self.action = action
        self.error = error
        self.tx_hash = tx_hash
        self.raw = raw
        reason = str(error) if error else (f"unknown revert data 0x{raw.hex()}" if raw else "no revert data")
        where = f" (tx {tx_hash})" if tx_hash else ""
        super().__init__(f"{action} reverted: {reason}{where}")

    @property
    def error_name(self) -> str | None:
        return self.error.name if self.error else None


class TransactionTimeout(ChainError):
    code = "transaction_timeout"

    def __init__(self, action: str, tx_hash: str, timeout_s: float) -> None:
        self.action = action
        self.tx_hash = tx_hash
        super().__init__(f"{action}: no receipt for {tx_hash} after {timeout_s:.0f} s; it may still be mined")


class MerkleError(SettlementError):
    code = "merkle_error"


class UnknownJob(SettlementError):
    code = "unknown_job"


class EpochBusy(SettlementError):
    code = "epoch_busy"


class LedgerMismatch(SettlementError):
    """The database and the chain disagree about settlement; an operator has to look."""

    code = "ledger_mismatch"


class BrokerUnavailable(SettlementError):
    code = "broker_unavailable"
