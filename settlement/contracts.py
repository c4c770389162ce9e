"""Typed wrappers over the four contracts. Writes take the sending account; reads return plain values."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from eth_abi.abi import decode, encode
from eth_abi.exceptions import DecodingError
from eth_account.signers.local import LocalAccount
from eth_typing import HexStr
from eth_utils.abi import function_signature_to_4byte_selector
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.exceptions import ContractLogicError, Web3RPCError
from web3.logs import DISCARD
from web3.types import FilterParams, TxParams, TxReceipt

from settlement.chain import Chain
from settlement.eip712 import (
    BATCH_SETTLEMENT_DOMAIN_NAME,
    DOMAIN_VERSION,
    Domain,
    TransferAuthorization,
    batch_channel_id,
    compact_signature,
    split_signature,
    token_domain,
)
from settlement.eip712 import voucher_domain as _voucher_domain
from settlement.errors import ChainMismatch, TransactionReverted

OPERATOR_ROLE = keccak(text="OPERATOR_ROLE")
SLASHER_ROLE = keccak(text="SLASHER_ROLE")
DEFAULT_ADMIN_ROLE = b"\x00" * 32

# Constants the contracts share with the code that drives them.
BPS = 10_000  # basis points: shares of a whole, as the contracts count them
PROVIDER_BPS = (
    8_000  # providers' share of what is redeemed; PayoutDistributor enforces it, the platform gets the rest
)
CHANNEL_CLOSED = 2**256 - 1  # VoucherEscrow's withdrawableAt of a channel whose payer has left


class _Wrapper:
    def __init__(self, chain: Chain, address: str, abi: list[dict[str, Any]]) -> None:
        self.chain = chain
        self.address = to_checksum_address(address)
        self.contract: Contract = chain.w3.eth.contract(address=self.address, abi=abi)
        chain.register_errors(abi)

    def _call(self, name: str, *args: Any) -> Any:
        return self.chain.call(self.contract.functions[name](*args), f"{type(self).__name__}.{name}")

    def _call_as(self, caller: str, name: str, *args: Any) -> Any:
        return self.chain.call(
            self.contract.functions[name](*args), f"{type(self).__name__}.{name}", sender=caller
        )

    def _send(self, sender: LocalAccount, name: str, *args: Any) -> TxReceipt:
        return self.chain.transact(
            sender, self.contract.functions[name](*args), f"{type(self).__name__}.{name}"
        )

    def grant_role(self, sender: LocalAccount, role: bytes, account: str) -> TxReceipt:
        return self._send(sender, "grantRole", role, to_checksum_address(account))

    def has_role(self, role: bytes, account: str) -> bool:
        return bool(self._call("hasRole", role, to_checksum_address(account)))


# Blocks of logs asked for at once: what public endpoints commonly allow.
LOG_PAGE_BLOCKS = 2_000


def _topic_address(address: str) -> str:
    return "0x" + bytes(12).hex() + to_checksum_address(address)[2:].lower()


@dataclass(frozen=True)
class AuthorizationFate:
    """An EIP-3009 authorization as the chain shows it at block ``block``."""

    paid_by: str | None  # the transaction whose transfer it authorized, whoever sent it
    spent: bool  # its nonce is used: paid, cancelled, or spent on another authorization of the same nonce
    block: int
    chain_time: int  # that block's timestamp: once past validBefore, an unspent authorization never lands

    def can_still_land(self, valid_before: int) -> bool:
        return not self.spent and self.chain_time < valid_before


class PaymentToken(_Wrapper):
    def name(self) -> str:
        return str(self._call("name"))

    def decimals(self) -> int:
        return int(self._call("decimals"))

    def domain(self) -> Domain:
        """The token's EIP-712 domain as the token states it (EIP-5267 ``eip712Domain()``), checked against the
        chain and address it was read from; a token without it is asked its ``version()``, and failing that
        signs with version "1"."""
        try:
            _, name, version, chain_id, contract, _, _ = self._call("eip712Domain")
        except TransactionReverted:
            return token_domain(self.name(), self.chain.chain_id, self.address, self._version())
        if int(chain_id) != self.chain.chain_id or to_checksum_address(contract) != self.address:
            raise ChainMismatch(
                f"token {self.address} states its domain as chain {chain_id}, contract {contract}"
            )
        return token_domain(str(name), self.chain.chain_id, self.address, str(version))

    def _version(self) -> str:
        """``version()``, which USDC has and this ABI does not: called by its selector."""
        selector = function_signature_to_4byte_selector("version()")
        call: TxParams = {"to": self.address, "data": HexStr("0x" + selector.hex())}
        try:
            answer = self.chain.read(lambda: self.chain.w3.eth.call(call))
            return str(decode(["string"], bytes(answer))[0])
        except (ContractLogicError, Web3RPCError, DecodingError):
            return DOMAIN_VERSION

    def balance_of(self, account: str) -> int:
        return int(self._call("balanceOf", to_checksum_address(account)))

    def total_supply(self) -> int:
        return int(self._call("totalSupply"))

    def allowance(self, owner: str, spender: str) -> int:
        return int(self._call("allowance", to_checksum_address(owner), to_checksum_address(spender)))

    def mint(self, sender: LocalAccount, *, to: str, amount: int) -> TxReceipt:
        return self._send(sender, "mint", to_checksum_address(to), amount)

    def approve(self, sender: LocalAccount, *, spender: str, amount: int) -> TxReceipt:
        return self._send(sender, "approve", to_checksum_address(spender), amount)

    def transfer_call(self, *, to: str, amount: int) -> ContractFunction:
        return self.contract.functions.transfer(to_checksum_address(to), amount)

    def transfer(self, sender: LocalAccount, *, to: str, amount: int) -> TxReceipt:
        return self.chain.transact(sender, self.transfer_call(to=to, amount=amount), "PaymentToken.transfer")

    def authorization_used(self, authorizer: str, nonce: bytes) -> bool:
        """Whether the nonce is spent: by a transfer, or by the authorizer cancelling it."""
        return bool(self._call("authorizationState", to_checksum_address(authorizer), nonce))

    def authorization_fate(
        self, authorizer: str, nonce: bytes, *, to: str, value: int, from_block: int
    ) -> AuthorizationFate:
        """What became of an EIP-3009 authorization of ``value`` from ``authorizer`` to ``to``, read at one block.

        It paid only if a transaction holds its ``AuthorizationUsed`` log followed at once by the token's
        ``Transfer(authorizer, to, value)``: nonces are the authorizer's, not the authorization's, so a payer can
        spend the same nonce on another authorization (to itself, of 1) or cancel it, and either leaves the same
        ``AuthorizationUsed`` or a spent nonce behind without paying. Logs are read from ``from_block`` (when the
        gateway took the authorization) a page of ``LOG_PAGE_BLOCKS`` at a time."""
        w3 = self.chain.w3
        block = self.chain.read(lambda: w3.eth.get_block("latest"))
        head, chain_time = int(block["number"]), int(block["timestamp"])
        used, transfer = self.contract.events.AuthorizationUsed(), self.contract.events.Transfer()
        topics = [used.topic, _topic_address(authorizer), "0x" + nonce.hex()]
        paid: str | None = None
        for first in range(max(0, from_block), head + 1, LOG_PAGE_BLOCKS):
            last = min(head, first + LOG_PAGE_BLOCKS - 1)
            query = cast(
                FilterParams, {"address": self.address, "fromBlock": first, "toBlock": last, "topics": topics}
            )
            for entry in self.chain.read(partial(w3.eth.get_logs, query)):
                receipt = self.chain.read(partial(w3.eth.get_transaction_receipt, entry["transactionHash"]))
                for moved in transfer.process_receipt(receipt, errors=DISCARD):
                    args = moved["args"]
                    if (
                        to_checksum_address(moved["address"]) == self.address
                        and moved["logIndex"] == entry["logIndex"] + 1
                        and to_checksum_address(args["from"]) == to_checksum_address(authorizer)
                        and to_checksum_address(args["to"]) == to_checksum_address(to)
                        and int(args["value"]) == value
                    ):
                        paid = entry["transactionHash"].to_0x_hex()
        spent = paid is not None or bool(
            self.chain.read(
                lambda: self.contract.functions.authorizationState(
                    to_checksum_address(authorizer), nonce
                ).call(block_identifier=head)
            )
        )
        return AuthorizationFate(paid, spent, head, chain_time)

    def transfer_with_authorization_call(
        self, *, authorization: TransferAuthorization, signature: bytes
    ) -> ContractFunction:
        return self.contract.functions.transferWithAuthorization(
            *_authorization_args(authorization, signature)
        )

    def transfer_with_authorization(
        self, sender: LocalAccount, *, authorization: TransferAuthorization, signature: bytes
    ) -> TxReceipt:
        call = self.transfer_with_authorization_call(authorization=authorization, signature=signature)
        return self.chain.transact(sender, call, "PaymentToken.transferWithAuthorization")

    def simulate_transfer_with_authorization(
        self, caller: str, *, authorization: TransferAuthorization, signature: bytes
    ) -> None:
        """Runs the transfer as an eth_call from ``caller``: raises TransactionReverted where sending would."""
        self._call_as(caller, "transferWithAuthorization", *_authorization_args(authorization, signature))


def _authorization_args(authorization: TransferAuthorization, signature: bytes) -> tuple[Any, ...]:
    r, s, v = split_signature(signature)
    return (
        to_checksum_address(authorization.sender),
        to_checksum_address(authorization.recipient),
        authorization.value,
        authorization.valid_after,
        authorization.valid_before,
        authorization.nonce,
        v,
        r,
        s,
    )


@dataclass(frozen=True)
class StakeInfo:
    staked: int
    unbonding: int
    unbonds_at: int


class StakeManager(_Wrapper):
    def stake(self, sender: LocalAccount, *, amount: int) -> TxReceipt:
        return self._send(sender, "stake", amount)

    def request_unstake(self, sender: LocalAccount, *, amount: int) -> TxReceipt:
        return self._send(sender, "requestUnstake", amount)

    def withdraw(self, sender: LocalAccount) -> TxReceipt:
        return self._send(sender, "withdraw")

    def slash_call(self, *, provider: str, amount: int, evidence_hash: bytes) -> ContractFunction:
        return self.contract.functions.slash(to_checksum_address(provider), amount, evidence_hash)

    def slash(self, sender: LocalAccount, *, provider: str, amount: int, evidence_hash: bytes) -> TxReceipt:
        call = self.slash_call(provider=provider, amount=amount, evidence_hash=evidence_hash)
        return self.chain.transact(sender, call, "StakeManager.slash")

    def slashed_amount(self, receipt: TxReceipt) -> int | None:
        """What a mined slash took, from its Slashed log; None when the receipt has none."""
        events = self.contract.events.Slashed().process_receipt(receipt, errors=DISCARD)
        return int(events[0]["args"]["amount"]) if events else None

    def evidence_used(self, evidence_hash: bytes) -> bool:
        return bool(self._call("evidenceUsed", evidence_hash))

    def set_min_stake(self, sender: LocalAccount, *, amount: int) -> TxReceipt:
        return self._send(sender, "setMinStake", amount)

    def is_active(self, provider: str) -> bool:
        return bool(self._call("isActive", to_checksum_address(provider)))

    def stake_of(self, provider: str) -> StakeInfo:
        staked, unbonding, unbonds_at = self._call("stakeOf", to_checksum_address(provider))
        return StakeInfo(int(staked), int(unbonding), int(unbonds_at))

    def min_stake(self) -> int:
        return int(self._call("minStake"))

    def unbonding_period(self) -> int:
        return int(self._call("unbondingPeriod"))

    def challenger_bps(self) -> int:
        return int(self._call("challengerBps"))

    def total_staked(self) -> int:
        return int(self._call("totalStaked"))

    def total_unbonding(self) -> int:
        return int(self._call("totalUnbonding"))


def channel_id(payer: str, salt: int) -> bytes:
    """The id VoucherEscrow gives the channel: the payer's address, then a 96-bit salt."""
    if not 0 <= salt < 2**96:
        raise ValueError(f"channel salt {salt} is outside uint96")
    return bytes.fromhex(to_checksum_address(payer)[2:]) + salt.to_bytes(12, "big")


def payer_of(channel: bytes) -> str:
    """The payer a VoucherEscrow channel id names (its first 20 bytes): the only address its vouchers may be
    signed by and its deposit withdrawn to."""
    return to_checksum_address(channel[:20])


def random_channel_id(payer: str) -> bytes:
    return channel_id(payer, int.from_bytes(os.urandom(12), "big"))


@dataclass(frozen=True)
class ChannelState:
    deposit: int
    claimed: int
    withdrawable_at: int


@dataclass(frozen=True)
class Redemption:
    """One channel in a redemption batch: the payer's voucher and the cumulative amount to claim now."""

    channel_id: bytes
    max_claimable_amount: int
    claim_to: int
    signature: bytes

    def as_abi(self) -> tuple[bytes, int, int, bytes, bytes]:
        r, vs = compact_signature(self.signature)
        return (self.channel_id, self.max_claimable_amount, self.claim_to, r, vs)


# VoucherEscrow.Skip, by ordinal: why a redemption entry paid nothing.
REDEMPTION_SKIPS = ("none", "claim_above_voucher", "invalid_voucher_signature", "nothing_to_redeem")


class VoucherEscrow(_Wrapper):
    def domain(self) -> Domain:
        return _voucher_domain(self.chain.chain_id, self.address)

    def redeem_call(self, redemptions: list[Redemption]) -> ContractFunction:
        return self.contract.functions.redeem([r.as_abi() for r in redemptions])

    def skipped(self, receipt: TxReceipt) -> dict[bytes, str]:
        """The entries of a mined redemption batch that paid nothing, each with why."""
        events = self.contract.events.RedemptionSkipped().process_receipt(receipt, errors=DISCARD)
        return {bytes(e["args"]["channelId"]): REDEMPTION_SKIPS[e["args"]["reason"]] for e in events}

    def deposit_call(self, *, channel: bytes, amount: int) -> ContractFunction:
        return self.contract.functions.deposit(channel, amount)

    def deposit(self, sender: LocalAccount, *, channel: bytes, amount: int) -> TxReceipt:
        return self.chain.transact(
            sender, self.deposit_call(channel=channel, amount=amount), "VoucherEscrow.deposit"
        )

    def redeem(self, sender: LocalAccount, redemptions: list[Redemption]) -> TxReceipt:
        return self.chain.transact(sender, self.redeem_call(redemptions), "VoucherEscrow.redeem")

    def initiate_withdraw(self, sender: LocalAccount, *, channel: bytes) -> TxReceipt:
        return self._send(sender, "initiateWithdraw", channel)

    def finalize_withdraw(self, sender: LocalAccount, *, channel: bytes) -> TxReceipt:
        return self._send(sender, "finalizeWithdraw", channel)

    def channel(self, channel: bytes) -> ChannelState:
        deposit, claimed = self._call("channel", channel)
        return ChannelState(int(deposit), int(claimed), int(self._call("withdrawableAt", channel)))

    def voucher_digest(self, channel: bytes, max_claimable_amount: int) -> bytes:
        return bytes(self._call("voucherDigest", channel, max_claimable_amount))

    def total_redeemed(self) -> int:
        return int(self._call("totalRedeemed"))

    def withdraw_delay(self) -> int:
        return int(self._call("withdrawDelay"))


class PayoutDistributor(_Wrapper):
    def post_root_call(self, *, epoch: int, root: bytes, provider_total: int) -> ContractFunction:
        return self.contract.functions.postRoot(epoch, root, provider_total)

    def post_root(self, sender: LocalAccount, *, epoch: int, root: bytes, provider_total: int) -> TxReceipt:
        return self._send(sender, "postRoot", epoch, root, provider_total)

    def claim(
        self,
        sender: LocalAccount,
        *,
        provider: str,
        cumulative_amount: int,
        proof: list[bytes],
        expected_root: bytes,
    ) -> TxReceipt:
        return self._send(
            sender, "claim", to_checksum_address(provider), cumulative_amount, proof, expected_root
        )

    def merkle_root(self) -> bytes:
        return bytes(self._call("merkleRoot"))

    def previous_root(self) -> bytes:
        return bytes(self._call("previousRoot"))

    def previous_root_valid_until(self) -> int:
        return int(self._call("previousRootValidUntil"))

    def epoch(self) -> int:
        return int(self._call("epoch"))

    def provider_total(self) -> int:
        return int(self._call("providerTotal"))

    def fees_paid(self) -> int:
        return int(self._call("feesPaid"))

    def claimed(self, provider: str) -> int:
        return int(self._call("claimed", to_checksum_address(provider)))

    def total_claimed(self) -> int:
        return int(self._call("totalClaimed"))

    def provider_pool(self, funded: int) -> int:
        return int(self._call("providerPool", funded))

    def funded(self) -> int:
        return int(self._call("funded"))

    def treasury(self) -> str:
        return str(self._call("treasury"))


# x402's batch-settlement contracts, at the addresses x402's client signs for (the same on every chain):
# BATCH_SETTLEMENT_ADDRESS is the verifyingContract of its channel ids and vouchers, and its ERC-3009 deposit
# authorizations are made out to the collector. Copied from x402.mechanisms.evm.batch_settlement.constants, since
# x402 is only a development dependency; tests/settlement/test_batch_settlement_chain.py binds the two.
BATCH_SETTLEMENT_ADDRESS = "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003"
ERC3009_DEPOSIT_COLLECTOR_ADDRESS = "0x4020806089470a89826cB9fB1f4059150b550004"
MIN_WITHDRAW_DELAY_S = 900  # BatchSettlement's bounds on a channel's withdrawDelay
MAX_WITHDRAW_DELAY_S = 2_592_000

_ZERO_ADDRESS = "0x" + "00" * 20


@dataclass(frozen=True)
class BatchChannelConfig:
    """An x402 batch-settlement channel's identity: every field is part of its id (``BatchSettlement.channel_id``)."""

    payer: str
    payer_authorizer: str  # signs the vouchers; the zero address: the payer signs them itself
    receiver: str
    receiver_authorizer: str  # claims and refunds, by sending or by signing
    token: str
    withdraw_delay: int  # seconds; BatchSettlement takes deposits only within [MIN, MAX]_WITHDRAW_DELAY_S
    salt: bytes  # 32 bytes

    def __post_init__(self) -> None:
        if len(self.salt) != 32:
            raise ValueError(f"a channel salt is 32 bytes, not {len(self.salt)}")
        if not 0 <= self.withdraw_delay < 2**40:
            raise ValueError(f"withdrawDelay {self.withdraw_delay} is outside uint40")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchChannelConfig:
        """From x402's JSON form (camelCase keys, the salt as 0x-hex or bytes)."""
        salt = data["salt"]
        return cls(
            payer=to_checksum_address(data["payer"]),
            payer_authorizer=to_checksum_address(data["payerAuthorizer"]),
            receiver=to_checksum_address(data["receiver"]),
            receiver_authorizer=to_checksum_address(data["receiverAuthorizer"]),
            token=to_checksum_address(data["token"]),
            withdraw_delay=int(data["withdrawDelay"]),
            salt=bytes(salt)
            if isinstance(salt, bytes | bytearray)
            else bytes.fromhex(str(salt).removeprefix("0x")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "payer": self.payer,
            "payerAuthorizer": self.payer_authorizer,
            "receiver": self.receiver,
            "receiverAuthorizer": self.receiver_authorizer,
            "token": self.token,
            "withdrawDelay": self.withdraw_delay,
            "salt": "0x" + self.salt.hex(),
        }

    def signer(self) -> str:
        """Who signs the channel's vouchers: its payer authorizer, or the payer when that is zero."""
        return self.payer if self.payer_authorizer == _ZERO_ADDRESS else self.payer_authorizer

    def as_abi(self) -> tuple[str, str, str, str, str, int, bytes]:
        return (
            to_checksum_address(self.payer),
            to_checksum_address(self.payer_authorizer),
            to_checksum_address(self.receiver),
            to_checksum_address(self.receiver_authorizer),
            to_checksum_address(self.token),
            self.withdraw_delay,
            self.salt,
        )


# Where a config is taken, x402's JSON form (as payments carry it and the database keeps it) will do as well.
ChannelConfigLike = BatchChannelConfig | Mapping[str, Any]


def batch_channel_config(config: ChannelConfigLike) -> BatchChannelConfig:
    return config if isinstance(config, BatchChannelConfig) else BatchChannelConfig.from_json(config)


@dataclass(frozen=True)
class BatchClaim:
    """One entry of a BatchSettlement claim: the payer's voucher and the cumulative total to claim now."""

    config: ChannelConfigLike
    max_claimable_amount: int  # the voucher's signed cumulative amount
    signature: bytes  # the voucher's, by the payer authorizer (or the payer)
    total_claimed: int  # the channel's new cumulative claimed total, at most the voucher and the balance

    def as_abi(self) -> tuple[tuple[tuple[str, str, str, str, str, int, bytes], int], bytes, int]:
        config = batch_channel_config(self.config).as_abi()
        return ((config, self.max_claimable_amount), self.signature, self.total_claimed)


@dataclass(frozen=True)
class BatchChannelState:
    """A BatchSettlement channel, read at one block. Amounts in token base units."""

    balance: int  # deposited and not withdrawn or refunded; total_claimed of it is the receiver's
    total_claimed: int
    withdraw_amount: int  # the payer's pending withdrawal request (paid capped at the unclaimed balance)
    withdraw_initiated_at: int  # unix seconds; zero when no withdrawal is pending
    refund_nonce: int  # what the next refundWithSignature must carry

    @property
    def unclaimed(self) -> int:
        return self.balance - self.total_claimed


@dataclass(frozen=True)
class ReceiverTotals:
    """What was claimed for a receiver in one token across its channels, and how much of it was paid out."""

    total_claimed: int
    total_settled: int

    @property
    def owed(self) -> int:
        return self.total_claimed - self.total_settled


class BatchSettlement(_Wrapper):
    """x402's batch-settlement channels (our contracts/src/BatchSettlement.sol on the devnet)."""

    def domain(self) -> Domain:
        """The EIP-712 domain of its channel ids, vouchers, claim batches and refunds."""
        return Domain(BATCH_SETTLEMENT_DOMAIN_NAME, DOMAIN_VERSION, self.chain.chain_id, self.address)

    def channel_id(self, config: ChannelConfigLike) -> bytes:
        """The id the contract gives ``config`` (its ``getChannelId``), computed here without a call."""
        c = batch_channel_config(config)
        return batch_channel_id(
            self.domain(),
            payer=c.payer,
            payer_authorizer=c.payer_authorizer,
            receiver=c.receiver,
            receiver_authorizer=c.receiver_authorizer,
            token=c.token,
            withdraw_delay=c.withdraw_delay,
            salt=c.salt,
        )

    def channel(self, channel_id: bytes) -> BatchChannelState:
        """The channel, its pending withdrawal and its refund nonce, in one eth_call (the contract's own multicall,
        so all three are read at the same block)."""
        reads = [
            self.contract.encode_abi(name, args=[channel_id])
            for name in ("channels", "pendingWithdrawals", "refundNonce")
        ]
        channels, pending, nonce = self._call("multicall", [bytes.fromhex(r[2:]) for r in reads])
        balance, claimed = decode(["uint128", "uint128"], channels)
        amount, initiated_at = decode(["uint128", "uint40"], pending)
        (refund_nonce,) = decode(["uint256"], nonce)
        return BatchChannelState(
            int(balance), int(claimed), int(amount), int(initiated_at), int(refund_nonce)
        )

    def receiver(self, receiver: str, token: str) -> ReceiverTotals:
        claimed, settled = self._call("receivers", to_checksum_address(receiver), to_checksum_address(token))
        return ReceiverTotals(int(claimed), int(settled))

    def receivers(self, receiver: str, token: str) -> ReceiverTotals:
        """The contract's getter name for :meth:`receiver`."""
        return self.receiver(receiver, token)

    def voucher_digest(self, channel_id: bytes, max_claimable_amount: int) -> bytes:
        return bytes(self._call("getVoucherDigest", channel_id, max_claimable_amount))

    def claim_batch_digest(self, claims: list[BatchClaim]) -> bytes:
        return bytes(self._call("getClaimBatchDigest", [c.as_abi() for c in claims]))

    def refund_digest(self, channel_id: bytes, *, nonce: int, amount: int) -> bytes:
        return bytes(self._call("getRefundDigest", channel_id, nonce, amount))

    # -- deposits --------------------------------------------------------------------------------------------

    @staticmethod
    def erc3009_collector_data(
        *, valid_after: int, valid_before: int, salt: bytes | int, signature: bytes
    ) -> bytes:
        """ERC3009DepositCollector's ``collectorData``: the payer's ReceiveWithAuthorization (to the collector,
        nonce keccak256(abi.encode(channelId, salt))) as abi.encode(validAfter, validBefore, salt, signature)."""
        salt_int = salt if isinstance(salt, int) else int.from_bytes(salt, "big")
        return encode(
            ["uint256", "uint256", "uint256", "bytes"], [valid_after, valid_before, salt_int, signature]
        )

    def deposit_call(
        self, *, config: ChannelConfigLike, amount: int, collector: str, collector_data: bytes
    ) -> ContractFunction:
        return self.contract.functions.deposit(
            batch_channel_config(config).as_abi(), amount, to_checksum_address(collector), collector_data
        )

    def deposit(
        self,
        sender: LocalAccount,
        *,
        config: ChannelConfigLike,
        amount: int,
        collector: str,
        collector_data: bytes,
    ) -> TxReceipt:
        call = self.deposit_call(
            config=config, amount=amount, collector=collector, collector_data=collector_data
        )
        return self.chain.transact(sender, call, "BatchSettlement.deposit")

    # -- claims and settlement -------------------------------------------------------------------------------

    def claim_call(self, claims: list[BatchClaim]) -> ContractFunction:
        """Sent by the channels' receiver authorizer. Entries that claim nothing new are skipped (ClaimSkipped);
        any other bad entry reverts the batch."""
        return self.contract.functions.claim([c.as_abi() for c in claims])

    def claim(self, sender: LocalAccount, claims: list[BatchClaim]) -> TxReceipt:
        return self.chain.transact(sender, self.claim_call(claims), "BatchSettlement.claim")

    def claim_with_signature_call(self, claims: list[BatchClaim], signature: bytes) -> ContractFunction:
        """Sent by anyone, with the receiver authorizer's signature of :meth:`claim_batch_digest`."""
        return self.contract.functions.claimWithSignature([c.as_abi() for c in claims], signature)

    def settle_call(self, *, receiver: str, token: str) -> ContractFunction:
        return self.contract.functions.settle(to_checksum_address(receiver), to_checksum_address(token))

    def settle(self, sender: LocalAccount, *, receiver: str, token: str) -> TxReceipt:
        return self.chain.transact(
            sender, self.settle_call(receiver=receiver, token=token), "BatchSettlement.settle"
        )

    def settled_amount(self, receipt: TxReceipt) -> int:
        """What a mined settle paid, from its Settled log (zero when there was nothing to pay)."""
        events = self.contract.events.Settled().process_receipt(receipt, errors=DISCARD)
        return sum(int(e["args"]["amount"]) for e in events)

    def multicall_call(self, calls: list[ContractFunction]) -> ContractFunction:
        """Several of this contract's calls in one transaction (e.g. claim, then settle), all or nothing."""
        return self.contract.functions.multicall(
            [bytes.fromhex(self.contract.encode_abi(c.fn_name, args=c.args)[2:]) for c in calls]
        )

    # -- the payer's exits -----------------------------------------------------------------------------------

    def refund_call(self, *, config: ChannelConfigLike, amount: int) -> ContractFunction:
        """Sent by the receiver authorizer: pays the payer up to ``amount`` of the unclaimed balance at once."""
        return self.contract.functions.refund(batch_channel_config(config).as_abi(), amount)

    def refund(self, sender: LocalAccount, *, config: ChannelConfigLike, amount: int) -> TxReceipt:
        return self.chain.transact(
            sender, self.refund_call(config=config, amount=amount), "BatchSettlement.refund"
        )

    def refund_with_signature_call(
        self, *, config: ChannelConfigLike, amount: int, nonce: int, signature: bytes
    ) -> ContractFunction:
        return self.contract.functions.refundWithSignature(
            batch_channel_config(config).as_abi(), amount, nonce, signature
        )

    def initiate_withdraw(self, sender: LocalAccount, *, config: ChannelConfigLike, amount: int) -> TxReceipt:
        return self._send(sender, "initiateWithdraw", batch_channel_config(config).as_abi(), amount)

    def finalize_withdraw(self, sender: LocalAccount, *, config: ChannelConfigLike) -> TxReceipt:
        return self._send(sender, "finalizeWithdraw", batch_channel_config(config).as_abi())
