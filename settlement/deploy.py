"""Deploying the contracts and reading a deployment back.

A deployment file records the chain id, every address, the roles, the parameters and a hash of each ABI.
Loading it reads the contracts' build artifacts and refuses a deployment made from other sources than these.

x402's batch-settlement contracts (BatchSettlement and its ERC3009DepositCollector) are not ours to place: x402's
client signs for fixed addresses. On anvil, ours are deployed and their runtime code copied to those addresses
(neither writes storage in its constructor, so nothing is lost); on any other chain they must already be there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from web3.types import RPCEndpoint

from settlement.artifacts import Artifact, load_artifacts
from settlement.chain import Chain
from settlement.contracts import (
    BATCH_SETTLEMENT_ADDRESS,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    OPERATOR_ROLE,
    SLASHER_ROLE,
    BatchSettlement,
    PaymentToken,
    PayoutDistributor,
    StakeManager,
    VoucherEscrow,
)
from settlement.eip712 import Domain, protocol_domain
from settlement.errors import ConfigurationError

TOKEN_DECIMALS = 6
ONE_TOKEN = 10**TOKEN_DECIMALS


@dataclass(frozen=True)
class DeployParams:
    """What a deployment is configured with. Amounts are in token base units, durations in seconds."""

    token: str | None = None  # an existing ERC-20 (USDC on real networks); None deploys PaymentToken
    token_name: str = "Strata USD"
    token_symbol: str = "sUSD"
    min_stake: int = 100 * ONE_TOKEN
    unbonding_period_s: int = 7 * 24 * 3600
    challenger_bps: int = 5_000  # the validator's half of a slash; the treasury gets the rest
    withdraw_delay_s: int = 24 * 3600  # how long the operator has to redeem after a payer starts leaving


@dataclass(frozen=True)
class Deployment:
    chain_id: int
    addresses: dict[str, str]
    abi_hashes: dict[str, str]
    roles: dict[str, str]
    params: dict[str, Any]
    block_number: int
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Deployment:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError as exc:
            raise ConfigurationError(
                f"no deployment file at {path}: run `strata chain deploy` first"
            ) from exc
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigurationError(f"{path} is not a deployment file: {exc}") from exc


@dataclass
class Contracts:
    """The deployed contracts, wrapped."""

    chain: Chain
    deployment: Deployment
    token: PaymentToken
    stake: StakeManager
    escrow: VoucherEscrow
    distributor: PayoutDistributor
    batch: BatchSettlement  # x402's batch-settlement channels
    batch_collector: str  # the ERC-3009 deposit collector x402's client authorizes its deposits to

    def protocol_domain(self) -> Domain:
        """The EIP-712 domain of the hop protocol's messages under this deployment (its StakeManager names it)."""
        return protocol_domain(self.deployment.chain_id, self.stake.address)

    @classmethod
    def load(
        cls, chain: Chain, deployment: Deployment, artifacts: dict[str, Artifact] | None = None
    ) -> Contracts:
        artifacts = artifacts or load_artifacts()
        chain.expect_chain_id(deployment.chain_id)
        for name, expected in deployment.abi_hashes.items():
            if artifacts[name].abi_hash != expected:
                raise ConfigurationError(
                    f"{name} at {deployment.addresses[name]} was deployed from other sources (ABI hash differs)"
                )
        a = deployment.addresses
        return cls(
            chain=chain,
            deployment=deployment,
            token=PaymentToken(chain, a["PaymentToken"], artifacts["PaymentToken"].abi),
            stake=StakeManager(chain, a["StakeManager"], artifacts["StakeManager"].abi),
            escrow=VoucherEscrow(chain, a["VoucherEscrow"], artifacts["VoucherEscrow"].abi),
            distributor=PayoutDistributor(chain, a["PayoutDistributor"], artifacts["PayoutDistributor"].abi),
            # A deployment recorded before these existed still names x402's fixed addresses.
            batch=BatchSettlement(
                chain, a.get("BatchSettlement", BATCH_SETTLEMENT_ADDRESS), artifacts["BatchSettlement"].abi
            ),
            batch_collector=to_checksum_address(
                a.get("ERC3009DepositCollector", ERC3009_DEPOSIT_COLLECTOR_ADDRESS)
            ),
        )


def deploy(
    chain: Chain,
    deployer: LocalAccount,
    *,
    operator: str,
    treasury: str,
    slasher: str,
    params: DeployParams = DeployParams(),
    artifacts: dict[str, Artifact] | None = None,
) -> Contracts:
    """Deploys and wires the contracts; ``deployer`` becomes their admin."""
    artifacts = artifacts or load_artifacts()
    admin = deployer.address
    # Checked before anything is deployed: elsewhere than anvil, x402's contracts must already be in place.
    on_anvil = _is_anvil(chain)
    if not on_anvil:
        _require_batch_settlement(chain)
    operator, treasury, slasher = (to_checksum_address(a) for a in (operator, treasury, slasher))

    def create(name: str, *args: Any) -> str:
        return chain.deploy(deployer, artifacts[name].abi, artifacts[name].bytecode, *args)

    token = params.token or create("PaymentToken", params.token_name, params.token_symbol, admin)
    distributor = create("PayoutDistributor", token, treasury, admin)
    escrow = create("VoucherEscrow", token, distributor, admin, params.withdraw_delay_s)
    stake = create(
        "StakeManager",
        token,
        treasury,
        admin,
        params.min_stake,
        params.unbonding_period_s,
        params.challenger_bps,
    )
    if on_anvil:
        _copy_batch_settlement(chain, create)
    batch_addresses = _require_batch_settlement(chain)
    deployment = Deployment(
        chain_id=chain.chain_id,
        addresses={
            "PaymentToken": to_checksum_address(token),
            "StakeManager": stake,
            "VoucherEscrow": escrow,
            "PayoutDistributor": distributor,
            **batch_addresses,
        },
        abi_hashes={name: artifact.abi_hash for name, artifact in artifacts.items()},
        roles={"admin": admin, "operator": operator, "treasury": treasury, "slasher": slasher},
        params=asdict(params),
        block_number=chain.read(lambda: int(chain.w3.eth.block_number)),
    )
    contracts = Contracts.load(chain, deployment, artifacts)
    contracts.escrow.grant_role(deployer, OPERATOR_ROLE, operator)
    contracts.distributor.grant_role(deployer, OPERATOR_ROLE, operator)
    contracts.stake.grant_role(deployer, SLASHER_ROLE, slasher)
    return contracts


# x402's batch-settlement contracts and where its client expects them.
_BATCH_CONTRACTS = (
    ("BatchSettlement", BATCH_SETTLEMENT_ADDRESS),
    ("ERC3009DepositCollector", ERC3009_DEPOSIT_COLLECTOR_ADDRESS),
)


def _is_anvil(chain: Chain) -> bool:
    return chain.read(lambda: str(chain.w3.client_version)).lower().startswith("anvil")


def _copy_batch_settlement(chain: Chain, create: Callable[..., str]) -> None:
    """Deploys BatchSettlement and its collector (told the fixed BatchSettlement address, the only caller it
    accepts) and copies their runtime code, immutables included, to x402's fixed addresses with anvil_setCode.
    Copying over an earlier copy would keep that copy's storage: a devnet is deployed once, on a fresh chain."""
    sources = {
        "BatchSettlement": create("BatchSettlement"),
        "ERC3009DepositCollector": create("ERC3009DepositCollector", BATCH_SETTLEMENT_ADDRESS),
    }
    w3 = chain.w3
    for name, target in _BATCH_CONTRACTS:
        code = chain.read(partial(w3.eth.get_code, to_checksum_address(sources[name])))
        answer = w3.provider.make_request(RPCEndpoint("anvil_setCode"), [target, "0x" + bytes(code).hex()])
        if answer.get("error"):
            raise ConfigurationError(f"anvil_setCode of {name} at {target} failed: {answer['error']}")


def _require_batch_settlement(chain: Chain) -> dict[str, str]:
    """x402's fixed addresses by contract name, once code is known to be at each."""
    for name, target in _BATCH_CONTRACTS:
        if not chain.read(partial(chain.w3.eth.get_code, to_checksum_address(target))):
            raise ConfigurationError(
                f"no {name} at {target}, where x402's batch-settlement clients expect it: x402 deploys it on "
                "public chains, and `strata chain deploy` copies ours there only on anvil"
            )
    return {name: to_checksum_address(target) for name, target in _BATCH_CONTRACTS}
