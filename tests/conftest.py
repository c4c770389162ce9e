"""Shared fixtures: one real anvil and one deployment per test session, rolled back after every test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from eth_account.signers.local import LocalAccount

from marketplace.devnet.anvil import Anvil
from marketplace.devnet.contracts import build_contracts
from settlement.artifacts import Artifact, load_artifacts
from settlement.chain import Chain
from settlement.deploy import ONE_TOKEN, Contracts, DeployParams, deploy

MIN_STAKE = 100 * ONE_TOKEN
UNBONDING_PERIOD_S = 3_600
WITHDRAW_DELAY_S = 600
CHALLENGER_BPS = 5_000


@dataclass(frozen=True)
class Actors:
    admin: LocalAccount
    operator: LocalAccount
    treasury: LocalAccount
    validator: LocalAccount
    providers: list[LocalAccount]
    payers: list[LocalAccount]
    outsider: LocalAccount


@pytest.fixture(scope="session", autouse=True)
def artifacts() -> dict[str, Artifact]:
    """The contracts as forge builds them (`make test` has built them already; a bare `pytest` builds what
    changed). Every process a test starts loads these same artifacts."""
    build_contracts()
    return load_artifacts()


@pytest.fixture(scope="session")
def anvil() -> Iterator[Anvil]:
    with Anvil(accounts=12) as node:
        yield node


@pytest.fixture(scope="session")
def chain(anvil: Anvil) -> Chain:
    return Chain(anvil.url, receipt_timeout_s=30)


@pytest.fixture(scope="session")
def actors(anvil: Anvil) -> Actors:
    a = anvil.accounts
    return Actors(a[0], a[1], a[2], a[3], a[4:7], a[7:10], a[11])


@pytest.fixture(scope="session")
def deployed(chain: Chain, actors: Actors, artifacts: dict[str, Artifact]) -> Contracts:
    contracts = deploy(
        chain,
        actors.admin,
        operator=actors.operator.address,
        treasury=actors.treasury.address,
        slasher=actors.validator.address,
        params=DeployParams(
            min_stake=MIN_STAKE,
            unbonding_period_s=UNBONDING_PERIOD_S,
            withdraw_delay_s=WITHDRAW_DELAY_S,
            challenger_bps=CHALLENGER_BPS,
        ),
        artifacts=artifacts,
    )
    for account in [*actors.providers, *actors.payers, actors.outsider]:
        contracts.token.mint(actors.admin, to=account.address, amount=10_000 * ONE_TOKEN)
    return contracts


@pytest.fixture
def contracts(deployed: Contracts, chain: Chain) -> Iterator[Contracts]:
    """The session's deployment, with every change a test makes rolled back afterwards."""
    snapshot = chain.w3.provider.make_request("evm_snapshot", [])["result"]
    try:
        yield deployed
    finally:
        chain.w3.provider.make_request("evm_revert", [snapshot])


def advance_time(chain: Chain, seconds: int) -> None:
    chain.w3.provider.make_request("evm_increaseTime", [seconds])
    chain.w3.provider.make_request("evm_mine", [])
