"""What a provider reads from the environment (and ``.env``), besides the chain's settings; the only place the
provider's commands read it."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from settlement.config import ChainSettings


class ProviderSettings(ChainSettings):
    """What provider commands read from the environment (and ``.env``), besides the chain's settings."""

    provider_key: SecretStr | None = Field(
        default=None, description="hex private key: signs receipts and asks, sends stake transactions"
    )
    gateway_addresses: list[str] = Field(
        default_factory=list, description="gateways whose job tickets are honoured"
    )
    validator_addresses: list[str] = Field(
        default_factory=list,
        description="validators allowed to fetch retained steps; none: the deployment file's slasher, if any",
    )
    provider_tls_dir: Path | None = Field(
        default=None, description="where the node keeps its TLS key and certificate, made on first start"
    )
    provider_retained_dir: Path | None = Field(
        default=None, description="where the node keeps steps for validators, read back on restart"
    )
    gateway_url: str | None = Field(default=None, description="gateway to post asks and heartbeats to")
