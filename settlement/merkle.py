"""A Merkle tree of cumulative payouts, laid out exactly like OpenZeppelin's StandardMerkleTree.

Leaves are ``keccak256(keccak256(abi.encode(address account, uint256 cumulativeAmount)))`` (double hashed, so a
leaf can never be mistaken for an inner node), sorted by hash; pairs are hashed in sorted order. The layout
matches @openzeppelin/merkle-tree, so roots and proofs agree with it and with MerkleProof.sol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from eth_abi.abi import encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from settlement.errors import MerkleError


def leaf_hash(account: str, cumulative_amount: int) -> bytes:
    return keccak(keccak(encode(["address", "uint256"], [to_checksum_address(account), cumulative_amount])))


def _hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)


@dataclass(frozen=True)
class PayoutTree:
    """The tree over ``{account: cumulative amount}``; build it with :meth:`build`."""

    amounts: Mapping[str, int]
    nodes: tuple[bytes, ...]
    _index: Mapping[str, int]

    @classmethod
    def build(cls, amounts: Mapping[str, int]) -> PayoutTree:
        if not amounts:
            raise MerkleError("a payout tree needs at least one leaf")
        normalised: dict[str, int] = {}
        for account, amount in amounts.items():
            key = to_checksum_address(account)
            if key in normalised:
                raise MerkleError(f"account {key} appears twice")
            if not 0 <= amount < 2**256:
                raise MerkleError(f"amount {amount} for {key} is outside uint256")
            normalised[key] = amount
        leaves = sorted((leaf_hash(account, amount), account) for account, amount in normalised.items())
        size = 2 * len(leaves) - 1
        nodes: list[bytes] = [b""] * size
        index: dict[str, int] = {}
        for i, (leaf, account) in enumerate(leaves):
            position = size - 1 - i
            nodes[position] = leaf
            index[account] = position
        for i in range(size - len(leaves) - 1, -1, -1):
            nodes[i] = _hash_pair(nodes[2 * i + 1], nodes[2 * i + 2])
        return cls(normalised, tuple(nodes), index)

    @property
    def root(self) -> bytes:
        return self.nodes[0]

    @property
    def total(self) -> int:
        return sum(self.amounts.values())

    def proof(self, account: str) -> list[bytes]:
        key = to_checksum_address(account)
        if key not in self._index:
            raise MerkleError(f"{key} has no leaf in this tree")
        position = self._index[key]
        proof: list[bytes] = []
        while position > 0:
            sibling = position - 1 if position % 2 == 0 else position + 1
            proof.append(self.nodes[sibling])
            position = (position - 1) // 2
        return proof


def verify(root: bytes, account: str, cumulative_amount: int, proof: list[bytes]) -> bool:
    node = leaf_hash(account, cumulative_amount)
    for sibling in proof:
        node = _hash_pair(node, sibling)
    return node == root
