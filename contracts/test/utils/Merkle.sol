// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/// @notice Builds OpenZeppelin standard Merkle trees over `(address provider, uint256 cumulativeAmount)` leaves,
/// as the OpenZeppelin merkle-tree package's StandardMerkleTree does: each leaf is
/// `keccak256(bytes.concat(keccak256(abi.encode(provider, cumulativeAmount))))`, leaves are sorted by hash and laid
/// out from the end of a flat array of `2n - 1` nodes, and each parent is the keccak of its two children in ascending
/// order. Written independently of the OpenZeppelin library the contract verifies with, so the tests check the
/// contract rather than the library against itself.
library Merkle {
    error EmptyTree();
    error LeafNotFound(bytes32 leaf);

    function leaf(address provider, uint256 cumulativeAmount) internal pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(provider, cumulativeAmount))));
    }

    function leaves(address[] memory providers, uint256[] memory amounts) internal pure returns (bytes32[] memory out) {
        out = new bytes32[](providers.length);
        for (uint256 i; i < providers.length; ++i) {
            out[i] = leaf(providers[i], amounts[i]);
        }
    }

    function root(bytes32[] memory leafHashes) internal pure returns (bytes32) {
        return _tree(leafHashes)[0];
    }

    /// @notice The proof for `leafHashes[index]`, siblings from the leaf up.
    function proof(bytes32[] memory leafHashes, uint256 index) internal pure returns (bytes32[] memory path) {
        bytes32[] memory tree = _tree(leafHashes);
        uint256 node = _position(tree, leafHashes.length, leafHashes[index]);
        uint256 depth;
        for (uint256 i = node; i > 0; i = (i - 1) / 2) {
            ++depth;
        }
        path = new bytes32[](depth);
        for (uint256 k; node > 0; ++k) {
            path[k] = tree[node % 2 == 1 ? node + 1 : node - 1];
            node = (node - 1) / 2;
        }
    }

    function hashPair(bytes32 a, bytes32 b) internal pure returns (bytes32) {
        return a < b ? keccak256(abi.encode(a, b)) : keccak256(abi.encode(b, a));
    }

    function _tree(bytes32[] memory leafHashes) private pure returns (bytes32[] memory tree) {
        uint256 n = leafHashes.length;
        if (n == 0) revert EmptyTree();
        bytes32[] memory sorted = _sorted(leafHashes);
        tree = new bytes32[](2 * n - 1);
        for (uint256 i; i < n; ++i) {
            tree[tree.length - 1 - i] = sorted[i];
        }
        for (uint256 i = n - 1; i > 0; --i) {
            tree[i - 1] = hashPair(tree[2 * i - 1], tree[2 * i]);
        }
    }

    function _position(bytes32[] memory tree, uint256 n, bytes32 wanted) private pure returns (uint256) {
        for (uint256 i = tree.length - n; i < tree.length; ++i) {
            if (tree[i] == wanted) return i;
        }
        revert LeafNotFound(wanted);
    }

    function _sorted(bytes32[] memory values) private pure returns (bytes32[] memory out) {
        out = new bytes32[](values.length);
        for (uint256 i; i < values.length; ++i) {
            bytes32 v = values[i];
            uint256 j = i;
            for (; j > 0 && out[j - 1] > v; --j) {
                out[j] = out[j - 1];
            }
            out[j] = v;
        }
    }
}
