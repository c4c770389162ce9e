"""Gas paid for settlement, measured on a local anvil.

Measures a batch redemption of N channels (the marginal gas of each channel is the slope between a batch of
one and a batch of N), a root post for 10 and for 1,000 providers, and a provider's claim, then amortizes an
epoch over the paid requests it settles:

    epoch gas = redeem(one batch over the client channels) + post root + one claim per provider
    amortized gas per request = epoch gas / (providers × requests per provider)

Each paid request is otherwise a voucher signed off chain; only the newest voucher of each channel is redeemed.

`claim_gas` is a provider's claim in steady state. A provider's very first claim (and the first claim on a new
distributor) costs about 20k gas more for each storage slot it takes from zero to non-zero (its `claimed`
entry, its token balance, the distributor's running total): EVM pricing of new storage, reported apart as
`claim_gas_first`.
The last line is one JSON object; the lines before it show how the amortized figure moves with the number of
client channels per epoch.
"""

from __future__ import annotations

import argparse
import json

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from marketplace.devnet.anvil import Anvil
from settlement.chain import Chain
from settlement.contracts import Redemption, channel_id
from settlement.deploy import ONE_TOKEN, Contracts, deploy
from settlement.eip712 import Voucher
from settlement.merkle import PayoutTree

TARGETS = {"redeem_gas_per_channel": 12_000, "post_root_gas": 60_000, "claim_gas": 70_000, "amortized": 100}


class Bench:
    def __init__(self, contracts: Contracts, admin: LocalAccount, operator: LocalAccount) -> None:
        self.c = contracts
        self.admin = admin
        self.operator = operator
        self.payers: list[LocalAccount] = []
        self.cumulative: dict[bytes, int] = {}
        self.epoch = 0
        self.earned: dict[str, int] = {}

    def open_channels(self, count: int, deposit: int) -> list[tuple[LocalAccount, bytes]]:
        """Channels for fresh payers, funded by the admin: a payer only signs, it needs no gas."""
        channels = []
        self.c.token.mint(self.admin, to=self.admin.address, amount=count * deposit)
        self.c.token.approve(self.admin, spender=self.c.escrow.address, amount=count * deposit)
        for _ in range(count):
            payer = Account.create()
            channel = channel_id(payer.address, 1)
            self.c.escrow.deposit(self.admin, channel=channel, amount=deposit)
            channels.append((payer, channel))
        return channels

    def redeem(self, channels: list[tuple[LocalAccount, bytes]], amount_each: int) -> int:
        domain = self.c.escrow.domain()
        batch = []
        for payer, channel in channels:
            total = self.cumulative.get(channel, 0) + amount_each
            self.cumulative[channel] = total
            batch.append(Redemption(channel, total, total, Voucher(channel, total).sign(payer, domain)))
        return int(self.c.escrow.redeem(self.operator, batch)["gasUsed"])

    def post(self, providers: list[str]) -> tuple[int, PayoutTree]:
        """Posts the next root, sharing everything newly poolable among ``providers``."""
        pool = self.c.distributor.provider_pool(self.c.distributor.funded())
        fresh = pool - sum(self.earned.values())
        for provider in providers:
            self.earned[provider] = self.earned.get(provider, 0) + fresh // len(providers)
        tree = PayoutTree.build(self.earned)
        self.epoch += 1
        receipt = self.c.distributor.post_root(
            self.operator, epoch=self.epoch, root=tree.root, provider_total=tree.total
        )
        return int(receipt["gasUsed"]), tree

    def claim(self, provider: str, tree: PayoutTree) -> int:
        receipt = self.c.distributor.claim(
            self.admin,
            provider=provider,
            cumulative_amount=tree.amounts[provider],
            proof=tree.proof(provider),
            expected_root=tree.root,
        )
        return int(receipt["gasUsed"])


def run(batch: int) -> dict[str, object]:
    with Anvil(accounts=3) as node:
        admin, operator, treasury = node.accounts
        contracts = deploy(
            Chain(node.url),
            admin,
            operator=operator.address,
            treasury=treasury.address,
            slasher=admin.address,
        )
        bench = Bench(contracts, admin, operator)
        channels = bench.open_channels(batch + 1, deposit=1_000 * ONE_TOKEN)

        # Warm-up round: the treasury's and distributor's first token balances cost a one-off 20k each.
        bench.redeem(channels[:1], ONE_TOKEN)
        bench.post([to_checksum_address(f"0x{0xA000 + i:040x}") for i in range(10)])

        one = bench.redeem(channels[:1], ONE_TOKEN)
        many = bench.redeem(channels[1:], ONE_TOKEN)
        per_channel = (many - one) / (batch - 1)

        small = [to_checksum_address(f"0x{0xA000 + i:040x}") for i in range(10)]
        large = [to_checksum_address(f"0x{0xB000 + i:040x}") for i in range(1_000)]
        post_10, _ = bench.post(small)
        bench.redeem(channels[:1], ONE_TOKEN)
        post_1000, tree = bench.post(large)

        claim_first = bench.claim(large[7], tree)
        bench.redeem(channels[:1], ONE_TOKEN)
        _, tree = bench.post(large)
        claim_again = bench.claim(large[7], tree)

    providers, requests_per_provider = 10, 1_000
    post_root = max(post_10, post_1000)
    claim = claim_again  # a provider's first claim ever is a one-off; see the module docstring

    def amortized(channels_per_epoch: int) -> float:
        redeem = one + per_channel * (channels_per_epoch - 1)
        return (redeem + post_root + providers * claim) / (providers * requests_per_provider)

    for count in (10, 100, 1_000):
        print(f"client channels per epoch {count:>5}: {amortized(count):7.1f} gas per paid request")

    return {
        "redeem_gas_per_channel": round(per_channel),
        "redeem_gas_batch_of_1": one,
        f"redeem_gas_batch_of_{batch}": many,
        "post_root_gas": post_root,
        "post_root_gas_10_providers": post_10,
        "post_root_gas_1000_providers": post_1000,
        "claim_gas": claim,
        "claim_gas_first": claim_first,
        "amortized_gas_per_request": round(amortized(10), 1),
        "amortization": {
            "providers": providers,
            "requests_per_provider": requests_per_provider,
            "client_channels_per_epoch": 10,
            "claims_per_provider_per_epoch": 1,
        },
        "targets": TARGETS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=100, help="channels in the measured redemption batch")
    args = parser.parse_args()
    print(json.dumps(run(args.batch)))


if __name__ == "__main__":
    main()
