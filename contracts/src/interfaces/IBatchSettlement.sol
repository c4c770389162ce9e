// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/// @title Payment channels of the x402 `batch-settlement` scheme.
/// @notice A payer funds a channel through a deposit collector and pays a receiver with cumulative EIP-712
/// `Voucher(channelId, maxClaimableAmount)` messages. The receiver's authorizer claims many channels at once,
/// which only moves accounting (`channels[id].totalClaimed`, `receivers[receiver][token].totalClaimed`); a
/// separate `settle(receiver, token)` pays out everything claimed for that pair in one transfer. The payer leaves
/// with a timed withdrawal (the receiver can still claim during the delay), or the receiver refunds it at once.
///
/// A channel is named by the EIP-712 hash of its `ChannelConfig` under this contract's domain
/// {name "x402 Batch Settlement", version "1", chainId, verifyingContract}, so its id fixes the payer, the
/// receiver, both authorizers, the token, the withdrawal delay and a salt, and every function that acts on a
/// channel takes the config and recomputes the id instead of trusting one.
///
/// Invariant: for every channel `totalClaimed <= balance`; `balance - totalClaimed` is what the payer may still
/// be charged, withdraw, or be refunded. The channel stays open after a withdrawal or refund: a later deposit
/// tops it up, and vouchers keep counting from the same cumulative total.
///
/// Everything here is immutable or computed: the contract has no storage written by a constructor, so its
/// runtime code can be placed at a fixed address (the address x402 clients sign for) without a constructor run.
interface IBatchSettlement {
    /// @notice A channel's identity. Every field is part of the channel id.
    /// @param payer Owns the deposit; withdrawals and refunds are paid to it.
    /// @param payerAuthorizer Signs vouchers (ECDSA) for the payer, e.g. a session key; address(0) means the payer
    /// signs them itself (ECDSA or ERC-1271).
    /// @param receiver Where claimed money is settled.
    /// @param receiverAuthorizer Authorizes claims and refunds, by sending them or by signing them.
    /// @param token The ERC-20 the channel holds.
    /// @param withdrawDelay Seconds between initiateWithdraw and finalizeWithdraw, within
    /// [MIN_WITHDRAW_DELAY, MAX_WITHDRAW_DELAY].
    /// @param salt Tells apart channels that share everything else.
    struct ChannelConfig {
        address payer;
        address payerAuthorizer;
        address receiver;
        address receiverAuthorizer;
        address token;
        uint40 withdrawDelay;
        bytes32 salt;
    }

    /// @notice A voucher as submitted: the full config (the id is recomputed from it) and the signed amount.
    struct Voucher {
        ChannelConfig channel;
        uint128 maxClaimableAmount;
    }

    /// @notice One entry of a claim batch.
    /// @param voucher The payer's voucher.
    /// @param signature The payer authorizer's (or payer's) signature of `Voucher(channelId, maxClaimableAmount)`.
    /// @param totalClaimed The channel's new cumulative claimed total: at most the voucher's amount and the balance.
    struct VoucherClaim {
        Voucher voucher;
        bytes signature;
        uint128 totalClaimed;
    }

    /// @notice A channel's money. `balance` is everything deposited and not withdrawn or refunded; `totalClaimed`
    /// of it belongs to the receiver.
    struct ChannelState {
        uint128 balance;
        uint128 totalClaimed;
    }

    /// @notice A payer's withdrawal request; `initiatedAt` is zero when none is pending.
    struct PendingWithdrawal {
        uint128 amount;
        uint40 initiatedAt;
    }

    /// @notice What was claimed for a receiver in one token, across all its channels, and how much of it was paid.
    struct ReceiverState {
        uint128 totalClaimed;
        uint128 totalSettled;
    }

    error ZeroAmount();
    error ZeroAddress();
    error WithdrawDelayOutOfRange(uint40 withdrawDelay);
    error BalanceOverflow(bytes32 channelId, uint256 balance, uint256 amount);
    error DepositNotDelivered(address collector, uint256 expected, uint256 received);
    error EmptyClaimBatch();
    error NotReceiverAuthorizer(bytes32 channelId, address caller);
    error InvalidVoucherSignature(bytes32 channelId);
    error InvalidAuthorizerSignature(address authorizer);
    error ClaimExceedsVoucher(bytes32 channelId, uint128 totalClaimed, uint128 maxClaimableAmount);
    error ClaimExceedsBalance(bytes32 channelId, uint128 totalClaimed, uint128 balance);
    error NotPayer(bytes32 channelId, address caller);
    error NoPendingWithdrawal(bytes32 channelId);
    error WithdrawDelayNotElapsed(bytes32 channelId, uint256 withdrawableAt, uint256 timestamp);
    error InvalidRefundNonce(bytes32 channelId, uint256 expected, uint256 given);
    error NothingToRefund(bytes32 channelId);

    /// @param sender Who submitted the deposit (a facilitator, or the payer itself).
    event Deposited(
        bytes32 indexed channelId, address indexed payer, address indexed collector, address sender, uint128 amount
    );
    /// @param amount What this claim added; `totalClaimed` is the channel's new cumulative total.
    event Claimed(
        bytes32 indexed channelId, address indexed receiver, address indexed token, uint128 amount, uint128 totalClaimed
    );
    /// @notice A claim that would not raise the channel's total (already claimed, e.g. a resubmitted batch) was
    /// left out; the rest of the batch went through.
    event ClaimSkipped(bytes32 indexed channelId, uint128 requested, uint128 totalClaimed);
    event Settled(address indexed receiver, address indexed token, address indexed sender, uint128 amount);
    event WithdrawInitiated(bytes32 indexed channelId, address indexed payer, uint128 amount, uint256 withdrawableAt);
    /// @param amount What was paid: the requested amount, capped at the unclaimed balance.
    event WithdrawFinalized(bytes32 indexed channelId, address indexed payer, uint128 amount);
    /// @param withdrawalLeft What is still pending of the payer's withdrawal after the refund (zero: none left).
    event Refunded(
        bytes32 indexed channelId, address indexed payer, uint128 amount, uint256 nonce, uint128 withdrawalLeft
    );

    /// @notice Credits `amount` of `config.token` to the channel, pulled from the payer through `collector`.
    /// @dev Anyone may submit (a facilitator submits the payer's signed authorization). Any collector is accepted:
    /// what is credited is checked against this contract's own balance, which must grow by at least `amount`
    /// during the collect call (the call cannot re-enter). A pending withdrawal is left as it is.
    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external;

    /// @notice Raises each channel's claimed total to its entry's `totalClaimed`. The caller must be every
    /// channel's receiverAuthorizer.
    /// @dev An entry whose `totalClaimed` is not above the channel's current total changes nothing and is skipped
    /// (`ClaimSkipped`), so a batch resubmitted after a partial success, or a stale entry, does not block the
    /// others. Every other failure (wrong caller, bad voucher signature, total above the voucher or the balance)
    /// reverts the whole batch with its named error. Claims stay allowed while a withdrawal is pending.
    function claim(VoucherClaim[] calldata voucherClaims) external;

    /// @notice `claim`, authorized by the receiverAuthorizer's EIP-712 signature of
    /// `ClaimBatch(ClaimEntry[] claims)` instead of by the sender. Anyone may submit it.
    /// @dev Every entry must name the same receiverAuthorizer (the signer). A signed batch needs no nonce: claims
    /// only ever raise totals to values the authorizer signed, so replaying one is a no-op.
    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature) external;

    /// @notice Pays `receiver` everything claimed for it in `token` and not yet paid. Anyone may call it.
    /// @dev With nothing to pay it does nothing (no transfer, no event) rather than revert, so that a settle
    /// racing another one, or following claims that were all skipped in one multicall, does not fail.
    function settle(address receiver, address token) external;

    /// @notice Asks to withdraw `amount` of the unclaimed balance after the channel's withdrawDelay. Only the payer
    /// or its payerAuthorizer.
    /// @dev A new request replaces a pending one and restarts the clock, so the receiver always has a full delay
    /// to claim before any withdrawal. Claims remain possible until the withdrawal is finalized.
    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external;

    /// @notice Pays the payer its pending withdrawal, capped at `balance - totalClaimed` as it stands now. Only
    /// the payer or its payerAuthorizer, from `initiatedAt + withdrawDelay` on.
    /// The amount paid (possibly zero, when the receiver claimed everything in the meantime) is in WithdrawFinalized.
    function finalizeWithdraw(ChannelConfig calldata config) external;

    /// @notice Pays the payer up to `amount` of the unclaimed balance at once. Only the receiverAuthorizer.
    /// @dev Pays `min(amount, balance - totalClaimed)`, reverting with NothingToRefund when that is zero. A pending
    /// withdrawal is reduced by what the refund paid and dropped once it is covered or nothing unclaimed is
    /// left; it is not cancelled outright, since a receiver could then refund a dust amount every delay to keep
    /// the payer from ever leaving. Increments `refundNonce(channelId)`, which invalidates signed refunds issued
    /// before it.
    function refund(ChannelConfig calldata config, uint128 amount) external;

    /// @notice `refund`, authorized by the receiverAuthorizer's EIP-712 signature of
    /// `Refund(channelId, nonce, amount)`, where `nonce` must be the channel's current `refundNonce`. Anyone may
    /// submit it.
    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external;

    /// @notice The channel id of `config`: its EIP-712 hash under this contract's domain.
    function getChannelId(ChannelConfig calldata config) external view returns (bytes32);

    /// @notice The EIP-712 digest the payer (or payerAuthorizer) signs for a voucher.
    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) external view returns (bytes32);

    /// @notice The EIP-712 digest the receiverAuthorizer signs for refundWithSignature.
    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) external view returns (bytes32);

    /// @notice The EIP-712 digest the receiverAuthorizer signs for claimWithSignature.
    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) external view returns (bytes32);

    function channels(bytes32 channelId) external view returns (uint128 balance, uint128 totalClaimed);

    function pendingWithdrawals(bytes32 channelId) external view returns (uint128 amount, uint40 initiatedAt);

    function receivers(address receiver, address token)
        external
        view
        returns (uint128 totalClaimed, uint128 totalSettled);

    /// @notice The nonce the next refundWithSignature of the channel must carry; every refund increments it.
    function refundNonce(bytes32 channelId) external view returns (uint256);
}
