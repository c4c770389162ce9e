"""Bonding stake in StakeManager: the one approve-then-stake flow, for `strata provider stake`, the devnet and
the tests."""

from __future__ import annotations

from collections.abc import Callable

from eth_account.signers.local import LocalAccount
from web3.types import TxReceipt

from settlement.deploy import Contracts


def bond(
    contracts: Contracts,
    account: LocalAccount,
    amount: int,
    *,
    progress: Callable[[str], object] = lambda _message: None,
) -> TxReceipt:
    """Stakes ``amount`` base units from ``account``, approving StakeManager first when its allowance is short.
    ``progress`` hears what is being sent, for a spinner."""
    token, stake = contracts.token, contracts.stake
    if token.allowance(account.address, stake.address) < amount:
        progress("approve")
        token.approve(account, spender=stake.address, amount=amount)
    progress("stake")
    return stake.stake(account, amount=amount)
