"""Sending a settlement transaction at most once, across crashes and reruns.

Each transaction has an idempotency key (``epoch:7:redeem``). It is signed, and the signed bytes are committed
under the key *before* they are broadcast; only then are they sent. Whatever happens next (the worker is
killed, the RPC times out, the answer is lost), a rerun finds the record and asks the chain about that one
hash:

    mined            the step is done (or, if it reverted, the revert is raised; a rerun signs anew)
    unknown, nonce   the sender's mined nonce has passed it without it: another transaction took the nonce, so
    passed           these bytes can never land; they are marked dropped and the step is signed again
    unknown          still ours to send: the *same bytes* are broadcast again, so it can land only once

Callers check the chain's state before calling (a channel already redeemed, a root already posted) so that a
step whose transaction landed under another key, or by hand, is not repeated either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from eth_account.signers.local import LocalAccount
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from web3.contract.contract import ContractFunction
from web3.types import TxReceipt

from settlement.chain import Chain, SignedTransaction
from settlement.db.schema import ChainSend, SendStatus
from settlement.errors import TransactionReverted

log = logging.getLogger(__name__)


def send_once(
    sessions: sessionmaker[Session],
    chain: Chain,
    sender: LocalAccount,
    key: str,
    build: Callable[[], ContractFunction],
    action: str,
    *,
    progress: Callable[[str], None] = lambda event: None,
) -> TxReceipt:
    """Sends the transaction ``build`` makes, once per ``key``; returns its receipt once mined.

    ``progress`` hears ``recorded:<key>`` once the signed bytes are committed (before they are broadcast) and
    ``mined:<key>`` once they are mined (before that is recorded).
    """
    known, receipt = _recorded(sessions, chain, key, action)
    if known is not None and receipt is None:
        log.info("%s: broadcasting %s again", key, known.tx_hash)
        return _finish(sessions, chain, key, known, progress)
    if known is not None and receipt is not None:
        if receipt["status"] == 1:
            return receipt
        return _finish(sessions, chain, key, known, progress)  # raises the decoded revert, marks it reverted
    signed = chain.sign(sender, build(), action)
    with sessions.begin() as session:
        record = session.scalar(select(ChainSend).where(ChainSend.key == key))
        if record is None:
            record = ChainSend(key=key)
            session.add(record)
        record.sender = signed.sender
        record.nonce = signed.nonce
        record.tx_hash = signed.tx_hash
        record.raw = "0x" + signed.raw.hex()
        record.status = SendStatus.SIGNED
    progress(f"recorded:{key}")
    return _finish(sessions, chain, key, signed, progress)


def reconcile(sessions: sessionmaker[Session], chain: Chain, key: str) -> None:
    """Brings ``key``'s record up to date with the chain, for a step the caller found already done on chain."""
    _recorded(sessions, chain, key, "reconcile")


def _recorded(
    sessions: sessionmaker[Session], chain: Chain, key: str, action: str
) -> tuple[SignedTransaction | None, TxReceipt | None]:
    """The live transaction recorded under ``key`` (None if there is none, or it can never land) and its
    receipt (None while it is not mined), with the record updated to match."""
    with sessions() as session:
        record = session.scalar(select(ChainSend).where(ChainSend.key == key))
        known = (
            _signed(record, action)
            if record is not None and record.status in (SendStatus.SIGNED, SendStatus.MINED)
            else None
        )
    if known is None:
        return None, None
    receipt = chain.receipt(known.tx_hash)
    if receipt is None and chain.nonce(known.sender) > known.nonce:
        log.warning("%s: transaction %s was never mined and its nonce is taken", key, known.tx_hash)
        _mark(sessions, key, SendStatus.DROPPED)
        return None, None
    if receipt is not None and receipt["status"] == 1:
        _mark(sessions, key, SendStatus.MINED)
    return known, receipt


def _signed(record: ChainSend, action: str) -> SignedTransaction:
    return SignedTransaction(
        record.sender, record.nonce, record.tx_hash, bytes.fromhex(record.raw[2:]), action, call={}
    )


def _finish(
    sessions: sessionmaker[Session],
    chain: Chain,
    key: str,
    signed: SignedTransaction,
    progress: Callable[[str], None],
) -> TxReceipt:
    try:
        receipt = chain.broadcast(signed)
    except TransactionReverted:
        _mark(sessions, key, SendStatus.REVERTED)
        raise
    progress(f"mined:{key}")
    _mark(sessions, key, SendStatus.MINED)
    return receipt


def _mark(sessions: sessionmaker[Session], key: str, status: str) -> None:
    with sessions.begin() as session:
        record = session.scalar(select(ChainSend).where(ChainSend.key == key))
        assert record is not None
        record.status = status
