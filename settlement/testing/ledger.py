"""Jobs recorded the way the gateway records them: real provider signatures on receipts, real payer signatures on
vouchers, real deposits on chain. Settlement's tests and benchmark meter and settle these without a gateway in
the loop."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from eth_account.signers.local import LocalAccount
from sqlalchemy.orm import Session, sessionmaker
from web3.types import TxParams, Wei

from settlement.contracts import random_channel_id
from settlement.db.engine import blocking_sessions, create_blocking_engine, migrate
from settlement.db.schema import Ask, Channel, Charge, Hop, HopStatus, Job, JobStatus, Provider, Receipt
from settlement.deploy import Contracts
from settlement.eip712 import Voucher, voucher_domain
from settlement.pricing import hop_charge
from settlement.tickets import KeyRing
from worker.transcript import StepHashes, sampling_hash, transcript_root
from worker.trust import ReceiptFields

MODEL_ROOT = "0x" + hashlib.sha256(b"tiny").hexdigest()
GATEWAY = "0x" + "42" * 20  # the gateway the receipts are for: settlement takes the one each names
SPANS = ((0, 2), (2, 4), (4, 6))


@contextmanager
def ledger_sessions(url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on the database at ``url``, migrated first."""
    migrate(url)
    engine = create_blocking_engine(url)
    try:
        yield blocking_sessions(engine)
    finally:
        engine.dispose()


@dataclass
class Recorder:
    """Writes jobs into a settlement database as a gateway on ``contracts``' chain would."""

    sessions: sessionmaker[Session]
    contracts: Contracts
    providers: list[LocalAccount]
    prices: tuple[int, ...] = (1_000, 2_000, 1_500)  # base units per million token-layers, per span
    channels: dict[str, bytes] = field(default_factory=dict)  # payer -> channel
    asks: list[int] = field(default_factory=list)  # the ask id each span's hops were matched on

    def __post_init__(self) -> None:
        with self.sessions.begin() as session:
            session.add_all(Provider(address=provider.address) for provider in self.providers)
            session.flush()
            for (start, end), provider, price in zip(SPANS, self.providers, self.prices, strict=True):
                ask = Ask(
                    provider=provider.address, model_root=MODEL_ROOT, layer_start=start, layer_end=end,
                    price_per_million=price, capacity=8, endpoint="127.0.0.1:9000",
                    tls_fingerprint="0x" + "00" * 32, nonce=1,
                    expires_at=2**40, signature="0x" + "00" * 65,
                )  # fmt: skip
                session.add(ask)
                session.flush()
                self.asks.append(ask.id)

    @property
    def chain_id(self) -> int:
        return self.contracts.deployment.chain_id

    def open_channel(self, payer: LocalAccount, deposit: int) -> bytes:
        channel = random_channel_id(payer.address)
        self.contracts.token.approve(payer, spender=self.contracts.escrow.address, amount=deposit)
        self.contracts.escrow.deposit(payer, channel=channel, amount=deposit)
        with self.sessions.begin() as session:
            session.add(Channel(id="0x" + channel.hex(), payer=payer.address))
        self.channels[payer.address] = channel
        return channel

    def open_channels(self, payer: LocalAccount, count: int, deposit: int) -> list[bytes]:
        """``count`` more channels of ``payer``, funded on chain without waiting for each deposit to be mined."""
        escrow, chain = self.contracts.escrow, self.contracts.chain
        self.contracts.token.approve(payer, spender=escrow.address, amount=count * deposit)
        ids = [random_channel_id(payer.address) for _ in range(count)]
        nonce = chain.nonce(payer.address, pending=True)
        fees = {"gas": 120_000, "maxFeePerGas": Wei(10**11), "maxPriorityFeePerGas": Wei(10**9)}
        hashes = []
        for i, channel in enumerate(ids):
            params = {"from": payer.address, "chainId": chain.chain_id, "nonce": nonce + i, **fees}
            tx = escrow.deposit_call(channel=channel, amount=deposit).build_transaction(
                cast(TxParams, params)
            )
            signed = payer.sign_transaction(cast(dict[str, Any], tx))
            hashes.append(chain.w3.eth.send_raw_transaction(signed.raw_transaction))
        for tx_hash in hashes:
            assert (
                chain.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60, poll_latency=0.01)["status"]
                == 1
            )
        with self.sessions.begin() as session:
            session.add_all(Channel(id="0x" + channel.hex(), payer=payer.address) for channel in ids)
        return ids

    def voucher_job(
        self,
        payer: LocalAccount,
        tokens: int,
        *,
        headroom: int = 0,
        status: str = JobStatus.COMPLETED,
        channel: bytes | None = None,
    ) -> str:
        """A job paid from ``channel`` (``payer``'s first one by default): the voucher raises the channel by the
        quote (charge + headroom)."""
        channel = channel or self.channels[payer.address]
        channel_hex = "0x" + channel.hex()
        job_id, charge = self._job(payer, tokens, status, scheme="voucher", channel_id=channel_hex)
        quote = charge + headroom
        with self.sessions.begin() as session:
            row = session.get(Channel, channel_hex)
            assert row is not None
            amount = row.voucher_amount + quote
            domain = voucher_domain(self.chain_id, self.contracts.escrow.address)
            row.voucher_amount = amount
            row.voucher_signature = "0x" + Voucher(channel, amount).sign(payer, domain).hex()
            row.charged += charge
            job = session.get(Job, job_id)
            assert job is not None
            job.quote, job.charged = quote, charge
            session.add(
                Charge(
                    job_id=job_id, payer=payer.address, scheme="voucher", channel_id=channel_hex,
                    quote=quote, amount=charge, refund=0,
                )
            )  # fmt: skip
        return job_id

    def exact_job(self, payer: LocalAccount, tokens: int, *, headroom: int = 0) -> str:
        """A job paid up front with an exact transfer of the quote to the operator."""
        job_id, charge = self._job(payer, tokens, JobStatus.COMPLETED, scheme="exact", channel_id=None)
        quote = charge + headroom
        operator = self.contracts.deployment.roles["operator"]
        self.contracts.token.transfer(payer, to=operator, amount=quote)
        with self.sessions.begin() as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.quote, job.charged = quote, charge
            session.add(
                Charge(
                    job_id=job_id, payer=payer.address, scheme="exact", channel_id=None,
                    quote=quote, amount=charge, refund=headroom,
                )
            )  # fmt: skip
        return job_id

    def _job(
        self, payer: LocalAccount, tokens: int, status: str, *, scheme: str, channel_id: str | None
    ) -> tuple[str, int]:
        job_id = "0x" + os.urandom(32).hex()
        now = datetime.now(UTC)
        # A prefill and a few decode steps; positions are what is billed, the hashes only have to link.
        steps = list(range(min(tokens, 4)))
        hashes = [[os.urandom(32) for _ in steps]]
        for _ in SPANS:
            hashes.append([os.urandom(32) for _ in steps])
        charge = 0
        with self.sessions.begin() as session:
            session.add(
                Job(
                    id=job_id, kind="chat", model_root=MODEL_ROOT, model_name="tiny", status=status,
                    scheme=scheme, payer=payer.address, channel_id=channel_id, quote=0, charged=0,
                    max_tokens=tokens, prompt_tokens=1, request={"sampling": {}}, created_at=now, finished_at=now,
                )
            )  # fmt: skip
            session.flush()
            session_id = os.urandom(16)
            last = len(SPANS) - 1
            for position, ((start, end), provider, price) in enumerate(
                zip(SPANS, self.providers, self.prices, strict=True)
            ):
                # The last span's steps carry the tokens it emitted; any will do here.
                transcript = [
                    StepHashes(
                        s,
                        hashes[position][s],
                        hashes[position + 1][s],
                        65 if position == last else None,
                        positions=tokens - len(steps) + 1
                        if s == 0
                        else 1,  # the prefill, then a token a step
                    )
                    for s in steps
                ]
                root = transcript_root(transcript)
                amount = hop_charge(tokens, end - start, price)
                charge += amount
                hop = Hop(
                    job_id=job_id, attempt=0, position=position, ask_id=self.asks[position], provider=provider.address,
                    endpoint=f"127.0.0.1:{9000 + position}", layer_start=start, layer_end=end,
                    price_per_million=price, tokens=tokens, transcript_root="0x" + root.hex(),
                    transcript=[entry.to_row() for entry in transcript], status=HopStatus.BILLED,
                    session=session_id.hex(),
                )  # fmt: skip
                session.add(hop)
                session.flush()
                receipt = KeyRing(provider, self.contracts.protocol_domain()).receipt(
                    ReceiptFields(
                        job_id=bytes.fromhex(job_id[2:]), session=session_id, gateway=GATEWAY,
                        provider=provider.address, model_root=bytes.fromhex(MODEL_ROOT[2:]), layer_start=start,
                        layer_end=end, positions=tokens, transcript_root=root,
                        sampling_hash=sampling_hash({}) if position == last else sampling_hash(None),
                    )
                )  # fmt: skip
                session.add(
                    Receipt(
                        hop_id=hop.id, job_id=job_id, provider=provider.address, tokens=tokens,
                        transcript_root="0x" + root.hex(), gateway=GATEWAY,
                        sampling_hash="0x" + receipt.sampling_hash.hex(),
                        signature="0x" + receipt.signature.hex(), verified=True, amount=amount,
                    )
                )  # fmt: skip
        return job_id, charge
