"""What a provider reads from the environment (and ``.env``), besides the chain's settings; the only place the
provider's commands read it."""

from __future__ import annotations

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
    chain_id: int = Field(default=31337, description="chain id in the EIP-712 domain of tickets and receipts")
    gateway_url: str | None = Field(default=None, description="gateway to post asks and heartbeats to")
