from __future__ import annotations

import pytest
from eth_utils import keccak

from settlement.errors import MerkleError
from settlement.merkle import PayoutTree, leaf_hash, verify

ACCOUNTS = [f"0x{i:040x}" for i in range(1, 8)]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_every_leaf_proves_against_the_root(size: int) -> None:
    tree = PayoutTree.build({account: 1_000 * (i + 1) for i, account in enumerate(ACCOUNTS[:size])})
    for account, amount in tree.amounts.items():
        assert verify(tree.root, account, amount, tree.proof(account))


def test_altered_amount_or_account_does_not_prove() -> None:
    tree = PayoutTree.build({account: 10 for account in ACCOUNTS})
    proof = tree.proof(ACCOUNTS[0])
    assert not verify(tree.root, ACCOUNTS[0], 11, proof)
    assert not verify(tree.root, ACCOUNTS[1], 10, proof)


def test_single_leaf_root_is_the_leaf() -> None:
    tree = PayoutTree.build({ACCOUNTS[0]: 5})
    assert tree.root == leaf_hash(ACCOUNTS[0], 5)
    assert tree.proof(ACCOUNTS[0]) == []


def test_leaf_is_double_hashed_abi_encoding() -> None:
    encoded = bytes(12) + bytes.fromhex(ACCOUNTS[2][2:]) + (42).to_bytes(32, "big")
    assert leaf_hash(ACCOUNTS[2], 42) == keccak(keccak(encoded))


def test_root_does_not_depend_on_insertion_order() -> None:
    amounts = {account: i for i, account in enumerate(ACCOUNTS)}
    assert PayoutTree.build(amounts).root == PayoutTree.build(dict(reversed(amounts.items()))).root


def test_total_sums_leaves() -> None:
    assert PayoutTree.build({ACCOUNTS[0]: 3, ACCOUNTS[1]: 4}).total == 7


@pytest.mark.parametrize(
    "amounts",
    [{}, {ACCOUNTS[0]: -1}, {ACCOUNTS[0]: 2**256}, {"0x" + "ab" * 20: 1, "0x" + "AB" * 20: 2}],
)
def test_rejects_bad_trees(amounts: dict[str, int]) -> None:
    with pytest.raises(MerkleError):
        PayoutTree.build(amounts)


def test_proof_for_unknown_account_is_refused() -> None:
    with pytest.raises(MerkleError):
        PayoutTree.build({ACCOUNTS[0]: 1}).proof(ACCOUNTS[1])
