// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {IVoucherEscrow} from "./interfaces/IVoucherEscrow.sol";
import {ChannelId} from "./libraries/ChannelId.sol";

/// @title Payment channels paid with cumulative EIP-712 vouchers.
/// @notice Behaviour, errors and events are documented on IVoucherEscrow.
contract VoucherEscrow is IVoucherEscrow, AccessControl, EIP712 {
    using SafeERC20 for IERC20;

    bytes32 public constant OPERATOR_ROLE = keccak256("OPERATOR_ROLE");
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    /// @notice `withdrawableAt` of a channel whose payer has left.
    uint256 public constant CLOSED = type(uint256).max;

    IERC20 public immutable token;
    /// @inheritdoc IVoucherEscrow
    address public immutable distributor;
    /// @inheritdoc IVoucherEscrow
    uint256 public immutable withdrawDelay;
    /// @inheritdoc IVoucherEscrow
    uint256 public totalRedeemed;

    // deposit and claimed share one slot: redeeming a channel costs one cold read and one write.
    mapping(bytes32 channelId => Channel) internal _channels;
    mapping(bytes32 channelId => uint256 timestamp) public withdrawableAt;

    constructor(IERC20 token_, address distributor_, address admin, uint256 withdrawDelay_)
        EIP712("Strata VoucherEscrow", "1")
    {
        if (address(token_) == address(0) || distributor_ == address(0) || admin == address(0)) revert ZeroAddress();
        token = token_;
        distributor = distributor_;
        withdrawDelay = withdrawDelay_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @inheritdoc IVoucherEscrow
    function deposit(bytes32 channelId, uint128 amount) external {
        if (amount == 0) revert ZeroAmount();
        address payer = ChannelId.payer(channelId);
        if (payer == address(0)) revert InvalidChannelId(channelId);
        _requireOpen(channelId);
        Channel storage c = _channels[channelId];
        uint256 newDeposit = uint256(c.deposit) + amount;
        if (newDeposit > type(uint128).max) revert DepositOverflow(channelId, c.deposit, amount);
        // forge-lint: disable-next-line(unsafe-typecast) -- checked against type(uint128).max just above
        c.deposit = uint128(newDeposit);
        token.safeTransferFrom(msg.sender, address(this), amount);
        emit ChannelFunded(channelId, payer, msg.sender, amount);
    }

    /// @inheritdoc IVoucherEscrow
    function redeem(Redemption[] calldata redemptions) external onlyRole(OPERATOR_ROLE) returns (uint256 total) {
        uint256 paid;
        for (uint256 i; i < redemptions.length; ++i) {
            (uint256 amount, Skip skip) = _redeemOne(redemptions[i]);
            if (skip == Skip.None) {
                total += amount;
                ++paid;
            } else {
                emit RedemptionSkipped(redemptions[i].channelId, skip);
            }
        }
        uint256 redeemed = totalRedeemed + total;
        if (total != 0) {
            totalRedeemed = redeemed;
            token.safeTransfer(distributor, total);
        }
        emit VouchersRedeemed(msg.sender, paid, total, redeemed);
    }

    function _redeemOne(Redemption calldata r) internal returns (uint256 amount, Skip skip) {
        // Each calldata field is read once: repeated struct reads cost a bounds check each, on the hot path.
        (bytes32 channelId, uint128 maxClaimable, uint128 claimTo) = (r.channelId, r.maxClaimableAmount, r.claimTo);
        if (claimTo > maxClaimable) return (0, Skip.ClaimAboveVoucher);
        bytes32 digest = _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, maxClaimable)));
        (address signer, ECDSA.RecoverError error,) = ECDSA.tryRecover(digest, r.r, r.vs);
        if (error != ECDSA.RecoverError.NoError || signer != ChannelId.payer(channelId)) {
            return (0, Skip.InvalidVoucherSignature);
        }

        Channel storage c = _channels[channelId];
        (uint128 deposited, uint128 claimed) = (c.deposit, c.claimed);
        // A voucher may promise more than was deposited; the operator takes what is there.
        uint128 claimable = claimTo < deposited ? claimTo : deposited;
        if (claimable <= claimed) return (0, Skip.NothingToRedeem);
        c.claimed = claimable;
        // claimable > claimed was checked above.
        unchecked {
            amount = claimable - claimed;
        }
    }

    /// @inheritdoc IVoucherEscrow
    function initiateWithdraw(bytes32 channelId) external {
        if (msg.sender != ChannelId.payer(channelId)) revert NotChannelPayer(channelId, msg.sender);
        _requireOpen(channelId);
        uint256 exitAt = block.timestamp + withdrawDelay;
        withdrawableAt[channelId] = exitAt;
        emit WithdrawInitiated(channelId, msg.sender, exitAt);
    }

    /// @inheritdoc IVoucherEscrow
    function finalizeWithdraw(bytes32 channelId) external returns (uint256 amount) {
        if (msg.sender != ChannelId.payer(channelId)) revert NotChannelPayer(channelId, msg.sender);
        uint256 exitAt = withdrawableAt[channelId];
        if (exitAt == 0) revert ChannelNotExiting(channelId);
        if (exitAt == CLOSED) revert ChannelClosed(channelId);
        if (block.timestamp < exitAt) revert WithdrawDelayNotElapsed(channelId, exitAt, block.timestamp);
        Channel storage c = _channels[channelId];
        amount = c.deposit - c.claimed;
        // What is left was withdrawn: from now on the channel holds exactly what was claimed from it.
        c.deposit = c.claimed;
        withdrawableAt[channelId] = CLOSED;
        if (amount != 0) token.safeTransfer(msg.sender, amount);
        emit WithdrawFinalized(channelId, msg.sender, amount);
    }

    function _requireOpen(bytes32 channelId) internal view {
        uint256 exitAt = withdrawableAt[channelId];
        if (exitAt == CLOSED) revert ChannelClosed(channelId);
        if (exitAt != 0) revert ChannelExiting(channelId, exitAt);
    }

    /// @inheritdoc IVoucherEscrow
    function channel(bytes32 channelId) external view returns (Channel memory) {
        return _channels[channelId];
    }

    /// @inheritdoc IVoucherEscrow
    function voucherDigest(bytes32 channelId, uint128 maxClaimableAmount) external view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, maxClaimableAmount)));
    }

    /// @inheritdoc IVoucherEscrow
    function channelIdOf(address payer, uint96 salt) external pure returns (bytes32) {
        return ChannelId.from(payer, salt);
    }

    /// @inheritdoc IVoucherEscrow
    function payerOf(bytes32 channelId) external pure returns (address) {
        return ChannelId.payer(channelId);
    }
}
