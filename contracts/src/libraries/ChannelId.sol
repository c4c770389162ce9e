// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/// @notice Channel ids carry their payer: address in the top 160 bits, a payer-chosen salt in the low 96.
/// Redemption reads the payer from the id, which saves a cold storage read per channel in a batch.
library ChannelId {
    function from(address payer_, uint96 salt) internal pure returns (bytes32) {
        return bytes32((uint256(uint160(payer_)) << 96) | uint256(salt));
    }

    function payer(bytes32 channelId) internal pure returns (address) {
        return address(uint160(uint256(channelId) >> 96));
    }
}
