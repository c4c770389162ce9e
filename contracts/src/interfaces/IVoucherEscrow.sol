// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/// @title Payment channels paid with cumulative EIP-712 vouchers.
/// @notice A payer deposits into a channel for the operator and signs `Voucher(channelId, maxClaimableAmount)`
/// messages whose amount only grows. The operator redeems many channels in one transaction; each pays only its
/// increase over what was already claimed, never more than the deposit, into the PayoutDistributor. The payer
/// leaves with initiateWithdraw, a delay during which the operator can still redeem, and finalizeWithdraw.
///
/// A channel id is the payer's address in its top 160 bits and a payer-chosen 96-bit salt below it, so
/// redemption learns the payer from the id instead of from storage.
interface IVoucherEscrow {
    /// @notice One channel's state. `deposit - claimed` is what the payer can still be charged or withdraw.
    struct Channel {
        uint128 deposit;
        uint128 claimed;
    }

    /// @notice One channel in a redemption batch.
    /// @param channelId The channel the voucher names.
    /// @param maxClaimableAmount The voucher's signed cumulative amount.
    /// @param claimTo The cumulative amount the operator claims now (what was actually charged), at most
    /// `maxClaimableAmount`.
    /// @param r The signature's r.
    /// @param vs The signature's s with v in the top bit (EIP-2098 compact form).
    struct Redemption {
        bytes32 channelId;
        uint128 maxClaimableAmount;
        uint128 claimTo;
        bytes32 r;
        bytes32 vs;
    }

    error ZeroAmount();
    error ZeroAddress();
    error InvalidChannelId(bytes32 channelId);
    error DepositOverflow(bytes32 channelId, uint256 deposit, uint256 amount);
    error NotChannelPayer(bytes32 channelId, address caller);
    error ChannelExiting(bytes32 channelId, uint256 withdrawableAt);
    error ChannelNotExiting(bytes32 channelId);
    error WithdrawDelayNotElapsed(bytes32 channelId, uint256 withdrawableAt, uint256 timestamp);
    error ClaimAboveVoucher(bytes32 channelId, uint256 claimTo, uint256 maxClaimableAmount);
    error InvalidVoucherSignature(bytes32 channelId, address signer);
    error NothingToRedeem(bytes32 channelId, uint256 claimable, uint256 claimed);

    event ChannelFunded(bytes32 indexed channelId, address indexed payer, address indexed funder, uint256 amount);
    event Redeemed(bytes32 indexed channelId, uint256 amount, uint256 claimed);
    event WithdrawInitiated(bytes32 indexed channelId, address indexed payer, uint256 withdrawableAt);
    event WithdrawFinalized(bytes32 indexed channelId, address indexed payer, uint256 amount);

    /// @notice Adds `amount` of the caller's tokens to `channelId`; the money belongs to the channel's payer.
    /// @dev Reverts while the channel is exiting, so a deposit can never be stranded behind a finished exit.
    function deposit(bytes32 channelId, uint128 amount) external;

    /// @notice Redeems a batch of vouchers. Only OPERATOR_ROLE. Reverts as a whole on any bad entry.
    /// @return total What was moved to the PayoutDistributor.
    function redeem(Redemption[] calldata redemptions) external returns (uint256 total);

    /// @notice Starts the payer's exit; the operator may still redeem until `withdrawableAt`.
    function initiateWithdraw(bytes32 channelId) external;

    /// @notice Pays the payer what was never claimed and closes the exit; the channel can be funded again.
    function finalizeWithdraw(bytes32 channelId) external returns (uint256 amount);

    function channel(bytes32 channelId) external view returns (Channel memory);

    /// @notice When an initiated withdrawal can be finalized; zero when none is pending.
    function withdrawableAt(bytes32 channelId) external view returns (uint256);

    /// @notice The EIP-712 digest a payer signs for `Voucher(channelId, maxClaimableAmount)`.
    function voucherDigest(bytes32 channelId, uint128 maxClaimableAmount) external view returns (bytes32);

    /// @notice Builds a channel id from its payer and salt.
    function channelIdOf(address payer, uint96 salt) external pure returns (bytes32);

    /// @notice Reads the payer out of a channel id.
    function payerOf(bytes32 channelId) external pure returns (address);

    /// @notice Everything ever redeemed, cumulative; the PayoutDistributor's funding.
    function totalRedeemed() external view returns (uint256);

    /// @notice Seconds between initiateWithdraw and finalizeWithdraw.
    function withdrawDelay() external view returns (uint256);

    function distributor() external view returns (address);
}
