"""Typed data: signatures recover to their signer, and the token accepts the EIP-3009 authorizations we sign."""

from __future__ import annotations

import os

import pytest
from eth_account import Account

from settlement.chain import Chain
from settlement.contracts import random_channel_id
from settlement.deploy import ONE_TOKEN, Contracts
from settlement.eip712 import (
    TransferAuthorization,
    Voucher,
    compact_signature,
    split_signature,
    voucher_domain,
)
from settlement.errors import TransactionReverted
from tests.conftest import Actors

DOMAIN = voucher_domain(31337, "0x" + "12" * 20)


def test_voucher_signature_recovers_its_signer() -> None:
    account = Account.create()
    voucher = Voucher(random_channel_id(account.address), 5)
    signature = voucher.sign(account, DOMAIN)
    assert voucher.signer(signature, DOMAIN) == account.address
    assert Voucher(voucher.channel_id, 6).signer(signature, DOMAIN) != account.address
    other_chain = voucher_domain(1, DOMAIN.verifying_contract)
    assert voucher.signer(signature, other_chain) != account.address


@pytest.mark.parametrize("channel, amount", [(b"\x00" * 31, 1), (b"\x00" * 32, -1), (b"\x00" * 32, 2**128)])
def test_voucher_rejects_malformed_fields(channel: bytes, amount: int) -> None:
    with pytest.raises(ValueError):
        Voucher(channel, amount)


def test_malformed_signature_is_refused() -> None:
    voucher = Voucher(b"\x01" * 32, 1)
    with pytest.raises(ValueError):
        voucher.signer(b"\x00" * 64, DOMAIN)


SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@pytest.mark.parametrize("amount", [0, 1, 10**18, 2**128 - 1])
def test_the_direct_voucher_digest_is_the_typed_data_hash(amount: int) -> None:
    account = Account.create()
    voucher = Voucher(random_channel_id(account.address), amount)
    signature = voucher.sign(account, DOMAIN)
    assert voucher.fast_signer(signature, DOMAIN) == voucher.signer(signature, DOMAIN) == account.address
    assert Voucher(voucher.channel_id, amount ^ 1).fast_signer(signature, DOMAIN) != account.address
    assert voucher.fast_signer(signature, voucher_domain(1, DOMAIN.verifying_contract)) != account.address


def test_fast_recovery_refuses_what_the_escrow_would_refuse() -> None:
    account = Account.create()
    voucher = Voucher(random_channel_id(account.address), 7)
    r, s, v = split_signature(voucher.sign(account, DOMAIN))
    # The same signature with s mirrored into the upper half: valid ECDSA, but OpenZeppelin's ECDSA (and
    # EIP-2098's compact form the escrow takes) cannot carry it, so a voucher signed so could never be redeemed.
    high_s = (SECP256K1_N - int.from_bytes(s, "big")).to_bytes(32, "big")
    for malformed in (r + high_s + bytes([55 - v]), r + s + bytes([29]), b"\x00" * 65, r + s):
        with pytest.raises(ValueError):
            voucher.fast_signer(malformed, DOMAIN)


def test_compact_signature_packs_parity_into_s() -> None:
    signature = Voucher(b"\x01" * 32, 1).sign(Account.create(), DOMAIN)
    r, s, v = split_signature(signature)
    compact_r, vs = compact_signature(signature)
    assert compact_r == r
    assert int.from_bytes(vs, "big") >> 255 == v - 27
    assert int.from_bytes(vs, "big") & ((1 << 255) - 1) == int.from_bytes(s, "big")


def _authorization(
    actors: Actors, chain: Chain, contracts: Contracts, **overrides: object
) -> TransferAuthorization:
    now = chain.timestamp()
    fields: dict[str, object] = dict(
        sender=actors.payers[0].address,
        recipient=actors.treasury.address,
        value=3 * ONE_TOKEN,
        valid_after=now - 60,
        valid_before=now + 600,
        nonce=os.urandom(32),
    )
    fields.update(overrides)
    return TransferAuthorization(**fields)  # type: ignore[arg-type]


def test_transfer_with_authorization_pays_once(contracts: Contracts, actors: Actors, chain: Chain) -> None:
    authorization = _authorization(actors, chain, contracts)
    signature = authorization.sign(actors.payers[0], contracts.token.domain())
    before = contracts.token.balance_of(actors.treasury.address)
    # Anyone may submit it; the signer pays the named recipient.
    contracts.token.transfer_with_authorization(
        actors.outsider, authorization=authorization, signature=signature
    )
    assert contracts.token.balance_of(actors.treasury.address) - before == 3 * ONE_TOKEN
    assert contracts.token.authorization_used(actors.payers[0].address, authorization.nonce)
    with pytest.raises(TransactionReverted) as replay:
        contracts.token.transfer_with_authorization(
            actors.outsider, authorization=authorization, signature=signature
        )
    assert replay.value.error_name == "ERC3009UsedAuthorization"


def test_expired_authorization_is_refused(contracts: Contracts, actors: Actors, chain: Chain) -> None:
    now = chain.timestamp()
    authorization = _authorization(actors, chain, contracts, valid_after=now - 600, valid_before=now - 1)
    signature = authorization.sign(actors.payers[0], contracts.token.domain())
    with pytest.raises(TransactionReverted) as caught:
        contracts.token.transfer_with_authorization(
            actors.outsider, authorization=authorization, signature=signature
        )
    assert caught.value.error_name == "ERC3009InvalidAuthorizationTime"


def test_authorization_signed_by_another_key_is_refused(
    contracts: Contracts, actors: Actors, chain: Chain
) -> None:
    authorization = _authorization(actors, chain, contracts)
    signature = authorization.sign(actors.outsider, contracts.token.domain())
    with pytest.raises(TransactionReverted) as caught:
        contracts.token.transfer_with_authorization(
            actors.outsider, authorization=authorization, signature=signature
        )
    assert caught.value.error_name == "ERC3009InvalidSignature"
