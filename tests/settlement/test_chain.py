"""The chain layer's failure modes: reverts decoded, endpoints down or wrong, deployments that do not match."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from marketplace.devnet.process import free_port
from settlement.artifacts import Artifact
from settlement.chain import Chain
from settlement.contracts import BPS, CHANNEL_CLOSED, OPERATOR_ROLE, PROVIDER_BPS, SLASHER_ROLE
from settlement.deploy import Contracts, Deployment
from settlement.errors import ChainMismatch, ChainUnavailable, ConfigurationError, TransactionReverted
from tests.conftest import Actors


def test_revert_is_decoded_with_its_arguments(contracts: Contracts, actors: Actors) -> None:
    with pytest.raises(TransactionReverted) as caught:
        contracts.stake.withdraw(actors.outsider)
    assert caught.value.error is not None
    assert caught.value.error.name == "NothingToWithdraw"
    assert caught.value.error.args == {"provider": actors.outsider.address}
    assert caught.value.code == "transaction_reverted"
    assert "NothingToWithdraw" in str(caught.value)


def test_unknown_revert_data_is_kept_raw(chain: Chain) -> None:
    assert chain.decode_revert(b"\xde\xad\xbe\xef" + b"\x00" * 32) is None


def test_unreachable_endpoint_is_reported() -> None:
    chain = Chain(f"http://127.0.0.1:{free_port()}", read_attempts=2, retry_backoff_s=0.01)
    with pytest.raises(ChainUnavailable):
        _ = chain.chain_id


def test_deployment_on_another_chain_is_refused(
    chain: Chain, deployed: Contracts, artifacts: dict[str, Artifact]
) -> None:
    elsewhere = dataclasses.replace(deployed.deployment, chain_id=1)
    with pytest.raises(ChainMismatch):
        Contracts.load(chain, elsewhere, artifacts)


def test_deployment_from_other_sources_is_refused(
    chain: Chain, deployed: Contracts, artifacts: dict[str, Artifact]
) -> None:
    changed = dataclasses.replace(
        deployed.deployment, abi_hashes={**deployed.deployment.abi_hashes, "VoucherEscrow": "0x" + "00" * 32}
    )
    with pytest.raises(ConfigurationError):
        Contracts.load(chain, changed, artifacts)


def test_deployment_file_round_trips(tmp_path: Path, deployed: Contracts) -> None:
    path = tmp_path / "deployment.json"
    deployed.deployment.save(path)
    assert Deployment.load(path) == deployed.deployment


@pytest.mark.parametrize("content", [None, "not json", '{"chain_id": 1}'])
def test_missing_or_malformed_deployment_file(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "deployment.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError):
        Deployment.load(path)


def test_roles_are_wired(deployed: Contracts, actors: Actors) -> None:
    assert deployed.escrow.has_role(OPERATOR_ROLE, actors.operator.address)
    assert deployed.distributor.has_role(OPERATOR_ROLE, actors.operator.address)
    assert deployed.stake.has_role(SLASHER_ROLE, actors.validator.address)
    assert not deployed.escrow.has_role(OPERATOR_ROLE, actors.outsider.address)


def test_the_constants_python_shares_with_the_contracts_are_theirs(deployed: Contracts) -> None:
    """Defined once in Python (settlement.contracts) and once in Solidity: bound here to the deployed contracts."""
    escrow, distributor, stake = deployed.escrow, deployed.distributor, deployed.stake
    assert escrow.chain.call(escrow.contract.functions.CLOSED(), "CLOSED") == CHANNEL_CLOSED
    assert escrow.chain.call(escrow.contract.functions.OPERATOR_ROLE(), "role") == OPERATOR_ROLE
    assert distributor.chain.call(distributor.contract.functions.OPERATOR_ROLE(), "role") == OPERATOR_ROLE
    assert stake.chain.call(stake.contract.functions.SLASHER_ROLE(), "role") == SLASHER_ROLE
    # The providers' share: PROVIDER_BPS of BPS, exactly, and rounded down below a whole.
    assert distributor.provider_pool(BPS) == PROVIDER_BPS
    assert distributor.provider_pool(BPS - 1) == (BPS - 1) * PROVIDER_BPS // BPS
