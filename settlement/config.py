"""Settings of the chain layer; the only place it reads the environment."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

RETENTION_MARGIN_S = 60.0

# The source checkout: migrations/, the contracts' build artifacts under build/, node_modules/.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ChainSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    rpc_url: str = Field(default="http://127.0.0.1:8545", description="JSON-RPC endpoint of the chain")
    deployment_file: Path = Field(
        default=Path(".strata/deployment.json"),
        description="where deploy writes, and everything else reads, addresses",
    )
    deployer_key: SecretStr | None = Field(
        default=None, description="hex private key that deploys and administers"
    )
    operator_key: SecretStr | None = Field(
        default=None, description="hex private key that redeems vouchers and posts roots"
    )
    rpc_timeout_s: float = Field(default=10.0, description="seconds to wait for one JSON-RPC answer")
    receipt_timeout_s: float = Field(default=120.0, description="seconds to wait for a transaction's receipt")


class SettlementSettings(ChainSettings):
    """What the settlement worker reads; the gateway shares the database and broker settings."""

    database_url: str = Field(
        default="sqlite:///.strata/gateway.db",
        description="SQLAlchemy URL: sqlite:///FILE (the default) or postgresql://USER@HOST/DB",
    )
    redis_url: str | None = Field(
        default=None,
        description="Celery's broker and result backend, redis://HOST:PORT/DB; `strata up` starts one when unset",
    )
    epoch_s: float = Field(default=300.0, gt=0, description="seconds between scheduled epoch closes")
    sample_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="probability that a billed hop is re-executed by the validator; see README, choosing p",
    )
    validator_key: SecretStr | None = Field(
        default=None,
        description="hex private key holding StakeManager's slasher role; without it nothing is sampled",
    )
    validator_address: str | None = Field(
        default=None,
        description="the validator's address, for a worker without VALIDATOR_KEY whose validator runs as another "
        "process (its own queue): hops are sampled for it",
    )
    models: list[str] = Field(
        default_factory=list,
        description="checkpoint directories served (the gateway) and re-executed (the validator), each `PATH` or "
        "`NAME=PATH` (JSON list)",
    )
    validation_window_s: float = Field(
        default=600.0,
        gt=0,
        description="seconds after a job a provider must still produce a sampled hop's data; providers keep it longer",
    )
    slash_bps: int = Field(
        default=10_000,
        gt=0,
        le=10_000,
        description="basis points of a provider's stake a validation slashes when the provider's output or tokens "
        "are proven wrong",
    )
    unavailable_slash_bps: int = Field(
        default=1_000,
        gt=0,
        le=10_000,
        description="basis points slashed when a provider cannot produce a sampled hop's data within the window",
    )
    excess_slash_bps: int = Field(
        default=1_000,
        gt=0,
        le=10_000,
        description="basis points slashed when a bf16/fp16 hop's mean error is past its calibrated bound but within "
        "1.4 times the validator's own noise",
    )

    @property
    def min_retention_s(self) -> int:
        """The least an ask may keep a session's steps: the validation window, and a margin for a session that
        ended a little before its job (the window runs from the job's end) and for clocks apart."""
        return math.ceil(self.validation_window_s + RETENTION_MARGIN_S)
