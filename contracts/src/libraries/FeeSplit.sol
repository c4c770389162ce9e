// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/// @notice The 80/20 split between providers and the platform.
library FeeSplit {
    uint256 internal constant BPS = 10_000;
    uint256 internal constant PROVIDER_BPS = 8_000;

    /// @dev Rounded down, so the platform's share (`amount - providerShare`) is 20% rounded up.
    function providerShare(uint256 amount) internal pure returns (uint256) {
        return amount * PROVIDER_BPS / BPS;
    }
}
