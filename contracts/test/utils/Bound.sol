// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/// @notice Clamps fuzzer input into a range; shared by tests and invariant handlers.
library Bound {
    error BoundInvalidRange(uint256 min, uint256 max);

    /// @dev Maps any `x` into [min, max]. Values already inside are kept; small values map to the bottom of the range
    /// and values near 2**256 to its top, so the fuzzer's favourite edge cases stay edge cases.
    function bound(uint256 x, uint256 min, uint256 max) internal pure returns (uint256) {
        if (min > max) revert BoundInvalidRange(min, max);
        if (x >= min && x <= max) return x;
        if (min == 0 && max == type(uint256).max) return x;
        uint256 size = max - min + 1;
        if (x < size && x < min) return min + x;
        uint256 fromTop = type(uint256).max - x;
        if (fromTop < size) return max - fromTop;
        return min + x % size;
    }
}
