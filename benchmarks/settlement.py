"""Settlement's cost and liveness, measured end to end on a local anvil and SQLite.

Jobs are recorded the way the gateway records them (three hops each, real provider-signed receipts, a voucher per
job), metered (every receipt signature recovered again) and settled by the real epoch closer.

Gas. What an epoch sends on chain depends on the channels it redeems and the providers it pays, not on how many
requests those channels paid for: a channel's voucher is cumulative, so one entry collects any number of
requests. So each channel count C in (10, 100, 1,000) is settled for real, twice (the first epoch writes every
storage slot from zero and is reported apart), and the steady epoch's gas is divided by each request count N in
(1k, 10k, 100k), N >= C:

    protocol gas per paid request  = (redeem batches + root post) / N
    claims                          one per provider leaf, as each would send it; reported apart, since a
                                    provider claims when it chooses: with `strata provider claim --min-amount`,
                                    a provider claiming every k epochs pays 1/k of it

Liveness. 3,000 channels paid in one epoch (more than one transaction may redeem under a 16.7M gas cap), an exit
finalized in the block before the redemption batch (automine off), and a refund whose transfer reverts: every
epoch must post. `halted_epochs` counts those that did not.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from eth_account.signers.local import LocalAccount
from sqlalchemy import select

from marketplace.devnet.anvil import Anvil
from settlement.chain import Chain
from settlement.db.schema import ChainSend, Epoch
from settlement.deploy import ONE_TOKEN, Contracts, deploy
from settlement.epochs import EpochCloser, EpochReport
from settlement.merkle import PayoutTree
from settlement.report import ledger_and_chain
from settlement.testing.ledger import Recorder, ledger_sessions

TARGET_GAS_PER_REQUEST = 100
REQUESTS = (1_000, 10_000, 100_000)
CHANNELS = (10, 100, 1_000)


@dataclass
class Network:
    contracts: Contracts
    recorder: Recorder
    closer: EpochCloser
    operator: LocalAccount
    admin: LocalAccount
    payers: list[LocalAccount]


@contextmanager
def network(tmp: str) -> Iterator[Network]:
    with Anvil(accounts=12) as anvil:
        a = anvil.accounts
        admin, operator, treasury, validator, providers, payers = a[0], a[1], a[2], a[3], a[4:7], a[7:12]
        chain = Chain(anvil.url, receipt_timeout_s=120)
        contracts = deploy(
            chain, admin, operator=operator.address, treasury=treasury.address, slasher=validator.address
        )
        for payer in payers:
            contracts.token.mint(admin, to=payer.address, amount=10_000_000 * ONE_TOKEN)
        contracts.token.mint(admin, to=operator.address, amount=1_000 * ONE_TOKEN)
        with ledger_sessions(f"sqlite:///{tmp}/settlement.db") as sessions:
            recorder = Recorder(sessions, contracts, providers)
            yield Network(
                contracts, recorder, EpochCloser(sessions, contracts, operator), operator, admin, payers
            )


class Liveness:
    """Counts the epochs closed and those that did not post."""

    def __init__(self) -> None:
        self.closed = 0
        self.halted = 0

    def close(self, closer: EpochCloser) -> EpochReport:
        self.closed += 1
        try:
            report = closer.close()
        except Exception as exc:
            print(f"epoch halted: {exc!r}")
            self.halted += 1
            raise
        if report.status != "posted":
            self.halted += 1
        return report


def gas_of(net: Network, epoch: int, step: str) -> int:
    with net.recorder.sessions() as session:
        hashes = session.scalars(
            select(ChainSend.tx_hash).where(ChainSend.key.like(f"epoch:{epoch}:{step}%"))
        )
        receipts = [net.contracts.chain.receipt(tx) for tx in hashes]
    return sum(int(r["gasUsed"]) for r in receipts if r is not None)


def claim_gas(net: Network, epoch_number: int) -> list[int]:
    with net.recorder.sessions() as session:
        epoch = session.get(Epoch, epoch_number)
        assert epoch is not None
        leaves = {account: int(amount) for account, amount in epoch.leaves.items()}
    tree, distributor = PayoutTree.build(leaves), net.contracts.distributor
    return [
        int(
            distributor.claim(
                net.admin,
                provider=account,
                cumulative_amount=amount,
                proof=tree.proof(account),
                expected_root=tree.root,
            )["gasUsed"]
        )
        for account, amount in leaves.items()
        if amount > distributor.claimed(account)
    ]


def settle_channels(net: Network, channels: int, liveness: Liveness) -> dict[str, Any]:
    """Two epochs over ``channels`` channels, one job on each; the second's gas is the steady state."""
    payer = net.payers[0]
    ids = net.recorder.open_channels(payer, channels, 10 * ONE_TOKEN)
    figures: dict[str, Any] = {}
    for name in ("first", "steady"):
        for channel in ids:
            net.recorder.voucher_job(payer, tokens=2_000, headroom=50, channel=channel)
        started = time.perf_counter()
        report = liveness.close(net.closer)
        elapsed = time.perf_counter() - started
        assert report.epoch is not None and report.channels == channels
        assert ledger_and_chain(net.recorder.sessions, net.contracts).matches
        figures[name] = {
            "redeem": gas_of(net, report.epoch, "redeem"),
            "post": gas_of(net, report.epoch, "post"),
            "claims": claim_gas(net, report.epoch),
            "close_s": round(elapsed, 1),
        }
    steady = figures["steady"]
    print(
        f"{channels} channels: redeem {steady['redeem']:,} gas ({steady['redeem'] / channels:,.0f} a channel), "
        f"post {steady['post']:,}, claims {steady['claims']}; close {steady['close_s']} s "
        f"(first epoch: redeem {figures['first']['redeem']:,}, post {figures['first']['post']:,})"
    )
    return figures


def exit_race(net: Network, liveness: Liveness) -> bool:
    """A payer's finalizeWithdraw mined in the block before the epoch's redemption batch; True when the epoch
    posted with every other channel collected."""
    escaped, honest = net.payers[1], net.payers[2]
    chain, escrow, recorder = net.contracts.chain, net.contracts.escrow, net.recorder
    leaving = recorder.open_channels(escaped, 1, 10 * ONE_TOKEN)[0]
    staying = recorder.open_channels(honest, 1, 10 * ONE_TOKEN)[0]
    recorder.voucher_job(escaped, tokens=2_000, channel=leaving)
    recorder.voucher_job(honest, tokens=2_000, channel=staying)
    escrow.initiate_withdraw(escaped, channel=leaving)
    chain.w3.provider.make_request("evm_increaseTime", [escrow.withdraw_delay()])

    def race(event: str) -> None:
        if event.startswith("recorded:") and ":redeem" in event:
            chain.w3.provider.make_request("evm_setAutomine", [False])
            tx = escrow.contract.functions.finalizeWithdraw(leaving).build_transaction(
                {"from": escaped.address, "nonce": chain.nonce(escaped.address, pending=True), "gas": 200_000,
                 "maxFeePerGas": 10**11, "maxPriorityFeePerGas": 5 * 10**10}
            )  # fmt: skip
            chain.w3.eth.send_raw_transaction(escaped.sign_transaction(tx).raw_transaction)
            chain.w3.provider.make_request("evm_setIntervalMining", [1])

    closer = EpochCloser(recorder.sessions, net.contracts, net.operator, checkpoint=race)
    try:
        report = liveness.close(closer)
    finally:
        chain.w3.provider.make_request("evm_setIntervalMining", [0])
        chain.w3.provider.make_request("evm_setAutomine", [True])
    return (
        report.channels == 1
        and escrow.channel(staying).claimed > 0
        and ledger_and_chain(recorder.sessions, net.contracts).matches
    )


def reverting_refund(net: Network, liveness: Liveness) -> bool:
    """An exact payer's refund reverts (the operator is short when it is due): the epoch posts anyway."""
    token, operator, recorder = net.contracts.token, net.operator, net.recorder
    recorder.exact_job(net.payers[3], tokens=2_000, headroom=77)
    drained: list[int] = []

    def drain(event: str) -> None:
        if event == "forward":
            drained.append(token.balance_of(operator.address))
            token.transfer(operator, to=net.admin.address, amount=drained[0])

    report = liveness.close(EpochCloser(recorder.sessions, net.contracts, operator, checkpoint=drain))
    token.transfer(net.admin, to=operator.address, amount=drained[0])
    return report.refunded == 0 and net.closer.pay_refunds() == 0


def many_channels(tmp: str, channels: int, liveness: Liveness) -> tuple[int, float]:
    with network(tmp) as net:
        ids = net.recorder.open_channels(net.payers[0], channels, ONE_TOKEN)
        for channel in ids:
            net.recorder.voucher_job(net.payers[0], tokens=1_000, channel=channel)
        started = time.perf_counter()
        report = liveness.close(net.closer)
        elapsed = time.perf_counter() - started
        assert ledger_and_chain(net.recorder.sessions, net.contracts).matches
        batches = len(
            {
                key
                for key in net.recorder.sessions().scalars(select(ChainSend.key))
                if key.startswith(f"epoch:{report.epoch}:redeem")
            }
        )
        print(
            f"{channels} channels in one epoch: {report.channels} settled in {batches} batches, {elapsed:.0f} s"
        )
        return report.channels, elapsed


def run(many: int) -> dict[str, object]:
    liveness = Liveness()
    curves: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, network(tmp) as net:
        for channels in CHANNELS:
            curves[channels] = settle_channels(net, channels, liveness)
        race_ok = exit_race(net, liveness)
        refund_ok = reverting_refund(net, liveness)
    with tempfile.TemporaryDirectory() as tmp:
        settled, many_s = many_channels(tmp, many, liveness)

    def per_request(channels: int, requests: int, *, claims: bool = False) -> float:
        steady = curves[channels]["steady"]
        gas = steady["redeem"] + steady["post"] + (sum(steady["claims"]) if claims else 0)
        return round(gas / requests, 1)

    curve = {
        f"{requests // 1000}k": {str(c): per_request(c, requests) for c in CHANNELS if c <= requests}
        for requests in REQUESTS
    }
    print("protocol gas per paid request (redeem + post), by requests then channels per epoch:", curve)
    return {
        "halted_epochs": liveness.halted,
        "epochs_closed": liveness.closed,
        "exit_race_settled": race_ok,
        "reverting_refund_left_owed": refund_ok,
        "channels_settled_one_epoch": settled,
        "channels_one_epoch_close_s": round(many_s, 1),
        "gas_per_request_curve": curve,
        "redeem_gas_per_channel": round(curves[1_000]["steady"]["redeem"] / 1_000),
        "post_gas": curves[100]["steady"]["post"],
        "claim_gas_each": curves[100]["steady"]["claims"],
        "claims_gas_per_request_10k": round(sum(curves[100]["steady"]["claims"]) / 10_000, 1),
        "protocol_gas_per_request_10k": per_request(100, 10_000),
        "target_gas_per_request": TARGET_GAS_PER_REQUEST,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--many", type=int, default=3_000, help="channels paid in the one big epoch")
    args = parser.parse_args()
    print(json.dumps(run(args.many)))


if __name__ == "__main__":
    main()
