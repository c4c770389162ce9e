"""The adversarial suite (marketplace.testing.adversary): every attack on the hop protocol and the market, run
against real provider processes (honest ones and rogues), the gateway's coordinator and app, and anvil. Each
must fail, and leave every honest party unblamed, unsuspended, paid for its work and not slowed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from marketplace.testing.adversary import ATTACKS, Arena, arena


@pytest.fixture(scope="module")
def battlefield(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    with arena(tmp_path_factory.mktemp("arena")) as started:
        yield started


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_the_attack_fails_and_harms_nobody_honest(battlefield: Arena, attack: str) -> None:
    verdict = ATTACKS[attack](battlefield)
    assert not verdict.succeeded, verdict.detail
    assert not verdict.honest_harmed, verdict.detail
