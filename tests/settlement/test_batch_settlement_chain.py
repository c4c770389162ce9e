"""Our BatchSettlement and ERC3009DepositCollector, at x402's fixed addresses on a real anvil, paid by x402's own
client code: channel ids and vouchers agree with x402's, its deposit authorization funds a channel, and claims
and settlement move the money."""

from __future__ import annotations

import dataclasses
import os

import pytest
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3.types import RPCEndpoint
from x402.mechanisms.evm.batch_settlement import constants as x402_constants
from x402.mechanisms.evm.batch_settlement.client.eip3009 import (
    create_batch_settlement_eip3009_deposit_payload,
)
from x402.mechanisms.evm.batch_settlement.encoding import build_erc3009_collector_data
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig as X402ChannelConfig
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id, get_batch_settlement_eip712_domain
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentRequirements

from settlement import deploy as deploy_module
from settlement.artifacts import Artifact
from settlement.chain import Chain
from settlement.contracts import (
    BATCH_SETTLEMENT_ADDRESS,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    MAX_WITHDRAW_DELAY_S,
    MIN_WITHDRAW_DELAY_S,
    BatchChannelConfig,
    BatchClaim,
)
from settlement.deploy import ONE_TOKEN, Contracts, Deployment
from settlement.errors import ConfigurationError, TransactionReverted
from tests.conftest import Actors, advance_time

ZERO_ADDRESS = "0x" + "00" * 20
# Far enough ahead that the session's other tests, which move anvil's clock, cannot expire a deposit.
DEPOSIT_TIMEOUT_S = 365 * 24 * 3600


def channel_config(contracts: Contracts, actors: Actors, payer: LocalAccount) -> BatchChannelConfig:
    """A channel paying the distributor, claimed by the operator, as the gateway offers them."""
    return BatchChannelConfig(
        payer=payer.address,
        payer_authorizer=ZERO_ADDRESS,
        receiver=contracts.distributor.address,
        receiver_authorizer=actors.operator.address,
        token=contracts.token.address,
        withdraw_delay=MIN_WITHDRAW_DELAY_S,
        salt=os.urandom(32),
    )


def as_x402(config: BatchChannelConfig) -> X402ChannelConfig:
    return X402ChannelConfig.from_dict(config.to_json())


def requirements(contracts: Contracts) -> PaymentRequirements:
    domain = contracts.token.domain()
    return PaymentRequirements(
        scheme="batch-settlement",
        network=f"eip155:{contracts.chain.chain_id}",
        asset=contracts.token.address,
        amount="1000",
        pay_to=contracts.distributor.address,
        max_timeout_seconds=DEPOSIT_TIMEOUT_S,
        extra={"name": domain.name, "version": domain.version},
    )


def x402_deposit(
    contracts: Contracts,
    actors: Actors,
    config: BatchChannelConfig,
    payer: LocalAccount,
    amount: int,
    voucher: int,
) -> tuple[bytes, bytes]:
    """Deposits with an authorization made by x402's client, submitted by the operator as the gateway does;
    returns the collector data and the voucher signature x402's client made alongside."""
    payload = create_batch_settlement_eip3009_deposit_payload(
        EthAccountSigner(payer), requirements(contracts), as_x402(config), amount, voucher
    )
    assert payload.deposit is not None and payload.voucher is not None
    auth = payload.deposit.authorization.erc3009_authorization
    assert auth is not None
    data = build_erc3009_collector_data(auth.valid_after, auth.valid_before, auth.salt, auth.signature)
    contracts.batch.deposit(
        actors.operator,
        config=config,
        amount=amount,
        collector=contracts.batch_collector,
        collector_data=data,
    )
    return data, bytes.fromhex(payload.voucher.signature.removeprefix("0x"))


def test_addresses_are_x402s(contracts: Contracts, chain: Chain, artifacts: dict[str, Artifact]) -> None:
    assert x402_constants.BATCH_SETTLEMENT_ADDRESS == BATCH_SETTLEMENT_ADDRESS
    assert x402_constants.ERC3009_DEPOSIT_COLLECTOR_ADDRESS == ERC3009_DEPOSIT_COLLECTOR_ADDRESS
    assert (x402_constants.MIN_WITHDRAW_DELAY, x402_constants.MAX_WITHDRAW_DELAY) == (
        MIN_WITHDRAW_DELAY_S,
        MAX_WITHDRAW_DELAY_S,
    )
    assert contracts.batch.address == BATCH_SETTLEMENT_ADDRESS
    assert contracts.batch_collector == ERC3009_DEPOSIT_COLLECTOR_ADDRESS
    assert contracts.deployment.addresses["BatchSettlement"] == BATCH_SETTLEMENT_ADDRESS
    collector = chain.w3.eth.contract(
        address=ERC3009_DEPOSIT_COLLECTOR_ADDRESS, abi=artifacts["ERC3009DepositCollector"].abi
    )
    assert collector.functions.batchSettlement().call() == BATCH_SETTLEMENT_ADDRESS


def test_channel_id_and_voucher_digest_match_x402(contracts: Contracts, actors: Actors) -> None:
    config = channel_config(contracts, actors, actors.payers[0])
    config = dataclasses.replace(config, payer_authorizer=actors.payers[1].address)
    expected = bytes.fromhex(compute_channel_id(as_x402(config), contracts.chain.chain_id)[2:])
    assert bytes(contracts.batch.contract.functions.getChannelId(config.as_abi()).call()) == expected
    assert contracts.batch.channel_id(config) == expected
    assert contracts.batch.channel_id(config.to_json()) == expected

    signable = encode_typed_data(
        domain_data=get_batch_settlement_eip712_domain(contracts.chain.chain_id),
        message_types=x402_constants.VOUCHER_TYPES,
        message_data={"channelId": expected, "maxClaimableAmount": 1234},
    )
    digest = keccak(b"\x19" + signable.version + signable.header + signable.body)
    assert contracts.batch.voucher_digest(expected, 1234) == digest


def test_x402_client_deposit_credits_the_channel(contracts: Contracts, actors: Actors) -> None:
    payer = actors.payers[0]
    config = channel_config(contracts, actors, payer)
    before = contracts.token.balance_of(payer.address)
    data, _ = x402_deposit(contracts, actors, config, payer, 5 * ONE_TOKEN, ONE_TOKEN)

    state = contracts.batch.channel(contracts.batch.channel_id(config))
    assert (state.balance, state.total_claimed, state.withdraw_initiated_at, state.refund_nonce) == (
        5 * ONE_TOKEN,
        0,
        0,
        0,
    )
    assert contracts.token.balance_of(payer.address) == before - 5 * ONE_TOKEN
    assert contracts.token.balance_of(BATCH_SETTLEMENT_ADDRESS) >= 5 * ONE_TOKEN
    # The authorization is spent: submitting it again is refused by the token.
    with pytest.raises(TransactionReverted) as caught:
        contracts.batch.deposit(
            actors.operator,
            config=config,
            amount=5 * ONE_TOKEN,
            collector=contracts.batch_collector,
            collector_data=data,
        )
    assert caught.value.error is not None and caught.value.error.name == "ERC3009UsedAuthorization"


def test_claim_then_settle_pays_the_receiver(contracts: Contracts, actors: Actors) -> None:
    payer, receiver = actors.payers[1], contracts.distributor.address
    config = channel_config(contracts, actors, payer)
    _, signature = x402_deposit(contracts, actors, config, payer, 5 * ONE_TOKEN, 2 * ONE_TOKEN)
    channel = contracts.batch.channel_id(config)
    token = contracts.token.address
    owed_before = contracts.batch.receiver(receiver, token)
    held_before = contracts.token.balance_of(receiver)

    # The claim is the operator's alone (the receiver authorizer).
    claim = BatchClaim(config.to_json(), 2 * ONE_TOKEN, signature, 2 * ONE_TOKEN - 1)
    with pytest.raises(TransactionReverted) as caught:
        contracts.batch.claim(actors.outsider, [claim])
    assert caught.value.error is not None and caught.value.error.name == "NotReceiverAuthorizer"
    contracts.batch.claim(actors.operator, [claim])
    assert contracts.batch.channel(channel).total_claimed == 2 * ONE_TOKEN - 1
    owed = contracts.batch.receivers(receiver, token)
    assert owed.total_claimed - owed_before.total_claimed == 2 * ONE_TOKEN - 1

    receipt = contracts.batch.settle(actors.outsider, receiver=receiver, token=token)
    assert contracts.batch.settled_amount(receipt) == owed.owed
    assert contracts.token.balance_of(receiver) - held_before == owed.owed
    assert contracts.batch.receiver(receiver, token).owed == 0

    # One more unit on the same voucher, claimed and settled in one multicall.
    more = dataclasses.replace(claim, total_claimed=2 * ONE_TOKEN)
    contracts.chain.transact(
        actors.operator,
        contracts.batch.multicall_call(
            [contracts.batch.claim_call([more]), contracts.batch.settle_call(receiver=receiver, token=token)]
        ),
        "BatchSettlement.multicall",
    )
    assert contracts.token.balance_of(receiver) - held_before == owed.owed + 1


def test_refund_and_withdrawal_read_back(contracts: Contracts, actors: Actors) -> None:
    payer = actors.payers[2]
    config = channel_config(contracts, actors, payer)
    x402_deposit(contracts, actors, config, payer, 5 * ONE_TOKEN, ONE_TOKEN)
    channel = contracts.batch.channel_id(config)
    start = contracts.token.balance_of(payer.address)

    contracts.batch.initiate_withdraw(payer, config=config, amount=3 * ONE_TOKEN)
    pending = contracts.batch.channel(channel)
    assert pending.withdraw_amount == 3 * ONE_TOKEN and pending.withdraw_initiated_at > 0

    contracts.batch.refund(actors.operator, config=config, amount=ONE_TOKEN)
    refunded = contracts.batch.channel(channel)
    assert (refunded.balance, refunded.withdraw_amount, refunded.refund_nonce) == (
        4 * ONE_TOKEN,
        2 * ONE_TOKEN,
        1,
    )
    assert refunded.withdraw_initiated_at == pending.withdraw_initiated_at

    with pytest.raises(TransactionReverted) as caught:
        contracts.batch.finalize_withdraw(payer, config=config)
    assert caught.value.error is not None and caught.value.error.name == "WithdrawDelayNotElapsed"
    advance_time(contracts.chain, MIN_WITHDRAW_DELAY_S)
    contracts.batch.finalize_withdraw(payer, config=config)
    assert contracts.batch.channel(channel).balance == 2 * ONE_TOKEN
    assert contracts.token.balance_of(payer.address) - start == 3 * ONE_TOKEN


def test_a_deployment_recorded_before_batch_settlement_still_loads(
    deployed: Contracts, chain: Chain, artifacts: dict[str, Artifact]
) -> None:
    record = deployed.deployment
    older = Deployment(
        chain_id=record.chain_id,
        addresses={
            k: v
            for k, v in record.addresses.items()
            if k not in ("BatchSettlement", "ERC3009DepositCollector")
        },
        abi_hashes={
            k: v
            for k, v in record.abi_hashes.items()
            if k not in ("BatchSettlement", "ERC3009DepositCollector")
        },
        roles=record.roles,
        params=record.params,
        block_number=record.block_number,
    )
    loaded = Contracts.load(chain, older, artifacts)
    assert loaded.batch.address == BATCH_SETTLEMENT_ADDRESS
    assert loaded.batch_collector == ERC3009_DEPOSIT_COLLECTOR_ADDRESS


def test_elsewhere_than_anvil_the_contracts_must_already_be_there(
    contracts: Contracts, chain: Chain, actors: Actors, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deploy_module, "_is_anvil", lambda _chain: False)
    chain.w3.provider.make_request(RPCEndpoint("anvil_setCode"), [ERC3009_DEPOSIT_COLLECTOR_ADDRESS, "0x"])
    sent = chain.nonce(actors.admin.address)
    with pytest.raises(ConfigurationError, match="ERC3009DepositCollector"):
        deploy_module.deploy(
            chain,
            actors.admin,
            operator=actors.operator.address,
            treasury=actors.treasury.address,
            slasher=actors.validator.address,
        )
    assert chain.nonce(actors.admin.address) == sent, "nothing was deployed"
