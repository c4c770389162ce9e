// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/// @title A way of moving a payer's tokens into BatchSettlement for one channel.
/// @notice BatchSettlement calls `collect` during `deposit` and credits the channel only with what its own token
/// balance actually grew by, so a collector cannot credit a channel with tokens it did not deliver. Each
/// collector decides what authorizes the pull (an ERC-3009 signature, a Permit2 witness, ...), and binds that
/// authorization to `channelId` so it cannot be spent on another channel.
interface IDepositCollector {
    /// @notice Moves exactly `amount` of `token` from `payer` to the caller (the BatchSettlement contract).
    /// @param payer The channel's payer, whose authorization `collectorData` carries.
    /// @param token The channel's token.
    /// @param amount What to move, in the token's base units.
    /// @param channelId The channel the deposit is for; the authorization must commit to it.
    /// @param collectorData The collector's own encoding of the payer's authorization.
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external;
}
