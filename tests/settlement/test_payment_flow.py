"""Deposit → vouchers → batch redemption → root post → claims, on a real anvil, with every balance checked."""

from __future__ import annotations

import pytest
from eth_account.signers.local import LocalAccount

from settlement.chain import Chain
from settlement.contracts import Redemption, channel_id, random_channel_id
from settlement.deploy import ONE_TOKEN, Contracts
from settlement.eip712 import Voucher, digest
from settlement.errors import TransactionReverted
from settlement.merkle import PayoutTree
from tests.conftest import WITHDRAW_DELAY_S, Actors, advance_time


def balances(contracts: Contracts, actors: Actors) -> dict[str, int]:
    named = {
        "escrow": contracts.escrow.address,
        "distributor": contracts.distributor.address,
        "treasury": actors.treasury.address,
        "outsider": actors.outsider.address,
        **{f"provider{i}": p.address for i, p in enumerate(actors.providers)},
        **{f"payer{i}": p.address for i, p in enumerate(actors.payers)},
    }
    return {name: contracts.token.balance_of(address) for name, address in named.items()}


def changes(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in before if after[name] != before[name]}


def open_channel(contracts: Contracts, payer: LocalAccount, amount: int, salt: int = 1) -> bytes:
    channel = channel_id(payer.address, salt)
    contracts.token.approve(payer, spender=contracts.escrow.address, amount=amount)
    contracts.escrow.deposit(payer, channel=channel, amount=amount)
    return channel


def voucher(
    contracts: Contracts, signer: LocalAccount, channel: bytes, cumulative: int, claim_to: int
) -> Redemption:
    signature = Voucher(channel, cumulative).sign(signer, contracts.escrow.domain())
    return Redemption(channel, cumulative, claim_to, signature)


def expect_revert(error_name: str, call: object, *args: object, **kwargs: object) -> TransactionReverted:
    with pytest.raises(TransactionReverted) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    assert caught.value.error_name == error_name, str(caught.value)
    return caught.value


def test_voucher_digest_matches_the_contract(contracts: Contracts, actors: Actors) -> None:
    channel = random_channel_id(actors.payers[0].address)
    signable = Voucher(channel, 123_456).signable(contracts.escrow.domain())
    assert digest(signable) == contracts.escrow.voucher_digest(channel, 123_456)


def test_channel_id_carries_the_payer(contracts: Contracts, actors: Actors) -> None:
    payer = actors.payers[1].address
    channel = channel_id(payer, 77)
    assert contracts.escrow.contract.functions.channelIdOf(payer, 77).call() == channel
    assert contracts.escrow.contract.functions.payerOf(channel).call() == payer


def test_two_epochs_end_to_end(contracts: Contracts, actors: Actors, chain: Chain) -> None:
    payer_a, payer_b = actors.payers[0], actors.payers[1]
    provider_x, provider_y = actors.providers[0], actors.providers[1]
    start = balances(contracts, actors)

    channel_a = open_channel(contracts, payer_a, 100 * ONE_TOKEN)
    channel_b = open_channel(contracts, payer_b, 50 * ONE_TOKEN)
    assert changes(start, balances(contracts, actors)) == {
        "escrow": 150 * ONE_TOKEN,
        "payer0": -100 * ONE_TOKEN,
        "payer1": -50 * ONE_TOKEN,
    }

    # Epoch 1: each voucher covers the request's quote; the operator claims only what was charged.
    before = balances(contracts, actors)
    contracts.escrow.redeem(
        actors.operator,
        [
            voucher(contracts, payer_a, channel_a, 12 * ONE_TOKEN, 10 * ONE_TOKEN),
            voucher(contracts, payer_b, channel_b, 6 * ONE_TOKEN, 5 * ONE_TOKEN),
        ],
    )
    assert changes(before, balances(contracts, actors)) == {
        "escrow": -15 * ONE_TOKEN,
        "distributor": 15 * ONE_TOKEN,
    }
    assert contracts.escrow.channel(channel_a).claimed == 10 * ONE_TOKEN
    assert contracts.escrow.total_redeemed() == 15 * ONE_TOKEN

    # Providers' cumulative earnings: 80% of 15 = 12, split 9 / 3. The treasury gets the other 3.
    tree = PayoutTree.build({provider_x.address: 9 * ONE_TOKEN, provider_y.address: 3 * ONE_TOKEN})
    before = balances(contracts, actors)
    contracts.distributor.post_root(actors.operator, epoch=1, root=tree.root, provider_total=tree.total)
    assert changes(before, balances(contracts, actors)) == {
        "distributor": -3 * ONE_TOKEN,
        "treasury": 3 * ONE_TOKEN,
    }

    before = balances(contracts, actors)
    contracts.distributor.claim(
        provider_x,
        provider=provider_x.address,
        cumulative_amount=9 * ONE_TOKEN,
        proof=tree.proof(provider_x.address),
        expected_root=tree.root,
    )
    # Anyone may claim for a provider; the money goes to the provider.
    contracts.distributor.claim(
        actors.outsider,
        provider=provider_y.address,
        cumulative_amount=3 * ONE_TOKEN,
        proof=tree.proof(provider_y.address),
        expected_root=tree.root,
    )
    assert changes(before, balances(contracts, actors)) == {
        "distributor": -12 * ONE_TOKEN,
        "provider0": 9 * ONE_TOKEN,
        "provider1": 3 * ONE_TOKEN,
    }

    # Epoch 2: payer A spends 20 more; cumulative earnings grow, and claims pay only the difference.
    contracts.escrow.redeem(
        actors.operator, [voucher(contracts, payer_a, channel_a, 31 * ONE_TOKEN, 30 * ONE_TOKEN)]
    )
    tree2 = PayoutTree.build({provider_x.address: 9 * ONE_TOKEN, provider_y.address: 19 * ONE_TOKEN})
    before = balances(contracts, actors)
    contracts.distributor.post_root(actors.operator, epoch=2, root=tree2.root, provider_total=tree2.total)
    contracts.distributor.claim(
        provider_y,
        provider=provider_y.address,
        cumulative_amount=19 * ONE_TOKEN,
        proof=tree2.proof(provider_y.address),
        expected_root=tree2.root,
    )
    assert changes(before, balances(contracts, actors)) == {
        "distributor": -20 * ONE_TOKEN,
        "treasury": 4 * ONE_TOKEN,
        "provider1": 16 * ONE_TOKEN,
    }

    # Payer A leaves with what was never claimed; the operator can still redeem during the delay.
    contracts.escrow.initiate_withdraw(payer_a, channel=channel_a)
    contracts.escrow.redeem(
        actors.operator, [voucher(contracts, payer_a, channel_a, 40 * ONE_TOKEN, 40 * ONE_TOKEN)]
    )
    expect_revert("WithdrawDelayNotElapsed", contracts.escrow.finalize_withdraw, payer_a, channel=channel_a)
    advance_time(chain, WITHDRAW_DELAY_S)
    before = balances(contracts, actors)
    contracts.escrow.finalize_withdraw(payer_a, channel=channel_a)
    assert changes(before, balances(contracts, actors)) == {
        "escrow": -60 * ONE_TOKEN,
        "payer0": 60 * ONE_TOKEN,
    }
    # The channel is closed for good: no deposit can ever meet a voucher signed before the exit.
    contracts.token.approve(payer_a, spender=contracts.escrow.address, amount=ONE_TOKEN)
    expect_revert("ChannelClosed", contracts.escrow.deposit, payer_a, channel=channel_a, amount=ONE_TOKEN)
    old = voucher(contracts, payer_a, channel_a, 90 * ONE_TOKEN, 90 * ONE_TOKEN)
    expect_skip("nothing_to_redeem", contracts, actors, [old])

    # Conservation: everything the payers put in is with the escrow, the distributor, providers or the treasury.
    end = balances(contracts, actors)
    assert sum(end.values()) == sum(start.values())
    # The last 10 redeemed arrive after epoch 2's root, so no fee or promise covers them yet.
    assert contracts.escrow.total_redeemed() == 45 * ONE_TOKEN
    assert contracts.distributor.fees_paid() == 7 * ONE_TOKEN
    assert contracts.distributor.funded() == 45 * ONE_TOKEN
    assert end["distributor"] == 45 * ONE_TOKEN - 7 * ONE_TOKEN - 28 * ONE_TOKEN
    assert contracts.distributor.total_claimed() == 28 * ONE_TOKEN


def expect_skip(reason: str, contracts: Contracts, actors: Actors, entries: list[Redemption]) -> None:
    """The batch lands, moves nothing, and reports every entry skipped for ``reason``."""
    before = balances(contracts, actors)
    receipt = contracts.escrow.redeem(actors.operator, entries)
    assert contracts.escrow.skipped(receipt) == {entry.channel_id: reason for entry in entries}
    assert balances(contracts, actors) == before


def test_bad_signature_pays_nothing(contracts: Contracts, actors: Actors) -> None:
    channel = open_channel(contracts, actors.payers[0], 10 * ONE_TOKEN)
    forged = voucher(contracts, actors.outsider, channel, 5 * ONE_TOKEN, 5 * ONE_TOKEN)
    expect_skip("invalid_voucher_signature", contracts, actors, [forged])
    # A genuine signature over another amount recovers to someone else as well.
    genuine = voucher(contracts, actors.payers[0], channel, 5 * ONE_TOKEN, 5 * ONE_TOKEN)
    tampered = Redemption(channel, 9 * ONE_TOKEN, 9 * ONE_TOKEN, genuine.signature)
    expect_skip("invalid_voucher_signature", contracts, actors, [tampered])


def test_decreasing_and_replayed_vouchers_pay_nothing(contracts: Contracts, actors: Actors) -> None:
    payer = actors.payers[0]
    channel = open_channel(contracts, payer, 10 * ONE_TOKEN)
    first = voucher(contracts, payer, channel, 6 * ONE_TOKEN, 6 * ONE_TOKEN)
    contracts.escrow.redeem(actors.operator, [first])
    expect_skip("nothing_to_redeem", contracts, actors, [first])
    lower = voucher(contracts, payer, channel, 4 * ONE_TOKEN, 4 * ONE_TOKEN)
    expect_skip("nothing_to_redeem", contracts, actors, [lower])
    assert contracts.escrow.channel(channel).claimed == 6 * ONE_TOKEN


def test_claim_above_the_voucher_pays_nothing(contracts: Contracts, actors: Actors) -> None:
    channel = open_channel(contracts, actors.payers[0], 10 * ONE_TOKEN)
    greedy = voucher(contracts, actors.payers[0], channel, 3 * ONE_TOKEN, 4 * ONE_TOKEN)
    expect_skip("claim_above_voucher", contracts, actors, [greedy])


def test_a_skipped_entry_does_not_stop_the_rest_of_its_batch(contracts: Contracts, actors: Actors) -> None:
    good = open_channel(contracts, actors.payers[0], 10 * ONE_TOKEN)
    bad = open_channel(contracts, actors.payers[1], 10 * ONE_TOKEN)
    entries = [
        voucher(contracts, actors.outsider, bad, 5 * ONE_TOKEN, 5 * ONE_TOKEN),
        voucher(contracts, actors.payers[0], good, 3 * ONE_TOKEN, 3 * ONE_TOKEN),
    ]
    receipt = contracts.escrow.redeem(actors.operator, entries)
    assert contracts.escrow.skipped(receipt) == {bad: "invalid_voucher_signature"}
    assert contracts.escrow.channel(good).claimed == 3 * ONE_TOKEN


def test_redemption_never_exceeds_the_deposit(contracts: Contracts, actors: Actors) -> None:
    payer = actors.payers[2]
    channel = open_channel(contracts, payer, 10 * ONE_TOKEN)
    before = balances(contracts, actors)
    contracts.escrow.redeem(
        actors.operator, [voucher(contracts, payer, channel, 25 * ONE_TOKEN, 25 * ONE_TOKEN)]
    )
    assert changes(before, balances(contracts, actors)) == {
        "escrow": -10 * ONE_TOKEN,
        "distributor": 10 * ONE_TOKEN,
    }
    again = voucher(contracts, payer, channel, 25 * ONE_TOKEN, 25 * ONE_TOKEN)
    expect_skip("nothing_to_redeem", contracts, actors, [again])


def test_only_the_operator_redeems(contracts: Contracts, actors: Actors) -> None:
    channel = open_channel(contracts, actors.payers[0], 10 * ONE_TOKEN)
    entry = voucher(contracts, actors.payers[0], channel, ONE_TOKEN, ONE_TOKEN)
    expect_revert("AccessControlUnauthorizedAccount", contracts.escrow.redeem, actors.outsider, [entry])


def _posted_tree(contracts: Contracts, actors: Actors) -> PayoutTree:
    channel = open_channel(contracts, actors.payers[0], 10 * ONE_TOKEN)
    contracts.escrow.redeem(
        actors.operator, [voucher(contracts, actors.payers[0], channel, 10 * ONE_TOKEN, 10 * ONE_TOKEN)]
    )
    tree = PayoutTree.build({p.address: 2 * ONE_TOKEN for p in actors.providers})
    contracts.distributor.post_root(actors.operator, epoch=1, root=tree.root, provider_total=tree.total)
    return tree


def test_claim_with_a_wrong_proof_is_refused(contracts: Contracts, actors: Actors) -> None:
    tree = _posted_tree(contracts, actors)
    provider = actors.providers[0]
    before = balances(contracts, actors)
    wrong_proof = tree.proof(actors.providers[1].address)
    expect_revert(
        "InvalidProof",
        contracts.distributor.claim,
        provider,
        provider=provider.address,
        cumulative_amount=2 * ONE_TOKEN,
        proof=wrong_proof,
        expected_root=tree.root,
    )
    expect_revert(
        "InvalidProof",
        contracts.distributor.claim,
        provider,
        provider=provider.address,
        cumulative_amount=3 * ONE_TOKEN,
        proof=tree.proof(provider.address),
        expected_root=tree.root,
    )
    assert balances(contracts, actors) == before


def test_double_claim_is_refused(contracts: Contracts, actors: Actors) -> None:
    tree = _posted_tree(contracts, actors)
    provider = actors.providers[2]
    kwargs = dict(
        provider=provider.address,
        cumulative_amount=2 * ONE_TOKEN,
        proof=tree.proof(provider.address),
        expected_root=tree.root,
    )
    contracts.distributor.claim(provider, **kwargs)
    before = balances(contracts, actors)
    expect_revert("NothingToClaim", contracts.distributor.claim, provider, **kwargs)
    assert balances(contracts, actors) == before


def test_root_that_promises_more_than_the_pool_is_refused(contracts: Contracts, actors: Actors) -> None:
    _posted_tree(contracts, actors)
    tree = PayoutTree.build({actors.providers[0].address: 8 * ONE_TOKEN + 1})
    error = expect_revert(
        "ProviderTotalExceedsPool",
        contracts.distributor.post_root,
        actors.operator,
        epoch=2,
        root=tree.root,
        provider_total=tree.total,
    )
    assert error.error is not None and error.error.args == {
        "posted": 8 * ONE_TOKEN + 1,
        "pool": 8 * ONE_TOKEN,
    }


def test_a_retried_root_post_cannot_land_twice(contracts: Contracts, actors: Actors) -> None:
    tree = _posted_tree(contracts, actors)
    expect_revert(
        "EpochOutOfOrder",
        contracts.distributor.post_root,
        actors.operator,
        epoch=1,
        root=tree.root,
        provider_total=tree.total,
    )


def test_stake_unstake_withdraw_after_unbonding(contracts: Contracts, actors: Actors, chain: Chain) -> None:
    provider = actors.providers[0]
    contracts.token.approve(provider, spender=contracts.stake.address, amount=200 * ONE_TOKEN)
    contracts.stake.stake(provider, amount=200 * ONE_TOKEN)
    assert contracts.stake.is_active(provider.address)
    contracts.stake.request_unstake(provider, amount=150 * ONE_TOKEN)
    assert not contracts.stake.is_active(provider.address)  # 50 left bonded, under the 100 minimum
    error = expect_revert("UnbondingNotFinished", contracts.stake.withdraw, provider)
    assert error.error is not None and error.error.args["provider"] == provider.address
    advance_time(chain, contracts.stake.unbonding_period())
    before = contracts.token.balance_of(provider.address)
    contracts.stake.withdraw(provider)
    assert contracts.token.balance_of(provider.address) - before == 150 * ONE_TOKEN
    assert contracts.stake.stake_of(provider.address).staked == 50 * ONE_TOKEN


def test_stake_below_minimum_is_refused(contracts: Contracts, actors: Actors) -> None:
    provider = actors.providers[1]
    contracts.token.approve(provider, spender=contracts.stake.address, amount=ONE_TOKEN)
    expect_revert("StakeBelowMinimum", contracts.stake.stake, provider, amount=ONE_TOKEN)


def test_unauthorized_slash_is_refused(contracts: Contracts, actors: Actors) -> None:
    provider = actors.providers[0]
    contracts.token.approve(provider, spender=contracts.stake.address, amount=100 * ONE_TOKEN)
    contracts.stake.stake(provider, amount=100 * ONE_TOKEN)
    expect_revert(
        "AccessControlUnauthorizedAccount",
        contracts.stake.slash,
        actors.outsider,
        provider=provider.address,
        amount=ONE_TOKEN,
        evidence_hash=b"\x01" * 32,
    )
    assert contracts.stake.stake_of(provider.address).staked == 100 * ONE_TOKEN


def test_unbonding_stake_stays_slashable(contracts: Contracts, actors: Actors) -> None:
    provider = actors.providers[2]
    contracts.token.approve(provider, spender=contracts.stake.address, amount=100 * ONE_TOKEN)
    contracts.stake.stake(provider, amount=100 * ONE_TOKEN)
    contracts.stake.request_unstake(provider, amount=100 * ONE_TOKEN)
    before = balances(contracts, actors)
    validator_before = contracts.token.balance_of(actors.validator.address)
    contracts.stake.slash(
        actors.validator, provider=provider.address, amount=40 * ONE_TOKEN, evidence_hash=b"\x02" * 32
    )
    assert contracts.stake.stake_of(provider.address).unbonding == 60 * ONE_TOKEN
    assert changes(before, balances(contracts, actors)) == {"treasury": 20 * ONE_TOKEN}
    assert contracts.token.balance_of(actors.validator.address) - validator_before == 20 * ONE_TOKEN
    expect_revert(
        "EvidenceAlreadyUsed",
        contracts.stake.slash,
        actors.validator,
        provider=provider.address,
        amount=ONE_TOKEN,
        evidence_hash=b"\x02" * 32,
    )
