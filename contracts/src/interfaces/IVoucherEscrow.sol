// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/// @title Payment channels paid with cumulative EIP-712 vouchers.
/// @notice A payer deposits into a channel for the operator and signs `Voucher(channelId, maxClaimableAmount)`
/// messages whose amount only grows. The operator redeems many channels in one transaction; each pays only its
/// increase over what was already claimed, never more than the deposit, into the PayoutDistributor. The payer
/// leaves with initiateWithdraw, a delay during which the operator can still redeem, and finalizeWithdraw, which
/// closes the channel for good: vouchers are cumulative, so one signed before the exit must never reach a later
/// deposit. A payer who comes back opens a channel with a new salt.
///
/// A channel id is the payer's address in its top 160 bits and a payer-chosen 96-bit salt below it, so
/// redemption learns the payer from the id instead of from storage.
///
/// Redemption logs one event per batch, not per channel: a log would add about 1.6k gas to each channel's ~11k.
/// A channel's claimed total is in `channel(id)`, and each redeemed voucher in the batch transaction's calldata.
///
/// An entry that cannot pay is skipped, with a `RedemptionSkipped` naming why, and never reverts the batch: a
/// payer can finalize its exit in the block before the operator's batch lands, and one such entry must not stop
/// every other channel, and with them every provider's payout, from settling.
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
    error ChannelClosed(bytes32 channelId);
    error WithdrawDelayNotElapsed(bytes32 channelId, uint256 withdrawableAt, uint256 timestamp);

    /// @notice Why a redemption entry paid nothing: its `claimTo` exceeds the voucher's amount
    /// (ClaimAboveVoucher); its signature is malformed or not the channel payer's (InvalidVoucherSignature); or the
    /// channel already gave what the voucher and deposit allow, having been redeemed before or closed by its payer's
    /// exit (NothingToRedeem).
    enum Skip {
        None,
        ClaimAboveVoucher,
        InvalidVoucherSignature,
        NothingToRedeem
    }

    event ChannelFunded(bytes32 indexed channelId, address indexed payer, address indexed funder, uint256 amount);
    /// @param channels The entries that paid; the skipped ones are logged apart.
    event VouchersRedeemed(address indexed operator, uint256 channels, uint256 amount, uint256 totalRedeemed);
    event RedemptionSkipped(bytes32 indexed channelId, Skip reason);
    event WithdrawInitiated(bytes32 indexed channelId, address indexed payer, uint256 withdrawableAt);
    event WithdrawFinalized(bytes32 indexed channelId, address indexed payer, uint256 amount);

    /// @notice Adds `amount` of the caller's tokens to `channelId`; the money belongs to the channel's payer.
    /// @dev Reverts once the payer has started to leave (ChannelExiting) or has left (ChannelClosed).
    function deposit(bytes32 channelId, uint128 amount) external;

    /// @notice Redeems a batch of vouchers. Only OPERATOR_ROLE. Each entry pays on its own: one that cannot pay is
    /// skipped and logged (`RedemptionSkipped`), and the rest still pay.
    /// @return total What was moved to the PayoutDistributor.
    function redeem(Redemption[] calldata redemptions) external returns (uint256 total);

    /// @notice Starts the payer's exit. The operator may redeem until the payer finalizes, which it can do from
    /// `withdrawableAt` on.
    function initiateWithdraw(bytes32 channelId) external;

    /// @notice Pays the payer what was never claimed and closes the channel.
    function finalizeWithdraw(bytes32 channelId) external returns (uint256 amount);

    function channel(bytes32 channelId) external view returns (Channel memory);

    /// @notice When an initiated withdrawal can be finalized; zero when none is pending, `type(uint256).max` once
    /// the channel is closed.
    function withdrawableAt(bytes32 channelId) external view returns (uint256);

    /// @notice The EIP-712 digest a payer signs for `Voucher(channelId, maxClaimableAmount)`.
    function voucherDigest(bytes32 channelId, uint128 maxClaimableAmount) external view returns (bytes32);

    /// @notice Builds a channel id from its payer and salt.
    function channelIdOf(address payer, uint96 salt) external pure returns (bytes32);

    /// @notice Reads the payer out of a channel id.
    function payerOf(bytes32 channelId) external pure returns (address);

    /// @notice Everything ever redeemed, cumulative.
    function totalRedeemed() external view returns (uint256);

    /// @notice Seconds between initiateWithdraw and finalizeWithdraw.
    function withdrawDelay() external view returns (uint256);

    function distributor() external view returns (address);
}
