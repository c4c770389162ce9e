// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {Multicall} from "@openzeppelin/contracts/utils/Multicall.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {IBatchSettlement} from "./interfaces/IBatchSettlement.sol";
import {IDepositCollector} from "./interfaces/IDepositCollector.sol";

/// @title Payment channels of the x402 `batch-settlement` scheme.
/// @notice Behaviour, errors and events are documented on IBatchSettlement.
/// @dev No storage is written by the constructor: EIP712 keeps its name and version in immutables (both fit a
/// ShortString) and rebuilds the domain separator whenever `address(this)` is not the deploying address, and the
/// reentrancy guard lives in transient storage. The runtime code can therefore be copied to x402's fixed address.
contract BatchSettlement is IBatchSettlement, EIP712, Multicall, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    uint40 public constant MIN_WITHDRAW_DELAY = 15 minutes;
    uint40 public constant MAX_WITHDRAW_DELAY = 30 days;

    bytes32 public constant CHANNEL_CONFIG_TYPEHASH = keccak256(
        "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,"
        "address token,uint40 withdrawDelay,bytes32 salt)"
    );
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    bytes32 public constant REFUND_TYPEHASH = keccak256("Refund(bytes32 channelId,uint256 nonce,uint128 amount)");
    bytes32 public constant CLAIM_ENTRY_TYPEHASH =
        keccak256("ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)");
    bytes32 public constant CLAIM_BATCH_TYPEHASH = keccak256(
        "ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
    );

    /// @inheritdoc IBatchSettlement
    mapping(bytes32 channelId => ChannelState) public channels;
    /// @inheritdoc IBatchSettlement
    mapping(bytes32 channelId => PendingWithdrawal) public pendingWithdrawals;
    /// @inheritdoc IBatchSettlement
    mapping(address receiver => mapping(address token => ReceiverState)) public receivers;
    /// @inheritdoc IBatchSettlement
    mapping(bytes32 channelId => uint256) public refundNonce;

    constructor() EIP712("x402 Batch Settlement", "1") {}

    // ---------------------------------------------------------------- deposit

    /// @inheritdoc IBatchSettlement
    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external
        nonReentrant
    {
        if (amount == 0) revert ZeroAmount();
        _checkConfig(config);
        if (collector == address(0)) revert ZeroAddress();
        bytes32 channelId = _channelId(config);
        ChannelState storage c = channels[channelId];
        uint256 newBalance = uint256(c.balance) + amount;
        if (newBalance > type(uint128).max) revert BalanceOverflow(channelId, c.balance, amount);

        // The collector is whatever the submitter names, so only the balance it leaves behind is trusted.
        IERC20 token = IERC20(config.token);
        uint256 before = token.balanceOf(address(this));
        IDepositCollector(collector).collect(config.payer, config.token, amount, channelId, collectorData);
        uint256 afterwards = token.balanceOf(address(this));
        uint256 received = afterwards > before ? afterwards - before : 0;
        if (received < amount) revert DepositNotDelivered(collector, amount, received);

        // forge-lint: disable-next-line(unsafe-typecast) -- checked against type(uint128).max above
        c.balance = uint128(newBalance);
        emit Deposited(channelId, config.payer, collector, msg.sender, amount);
    }

    // ---------------------------------------------------------------- claim and settle

    /// @inheritdoc IBatchSettlement
    function claim(VoucherClaim[] calldata voucherClaims) external nonReentrant {
        uint256 n = voucherClaims.length;
        if (n == 0) revert EmptyClaimBatch();
        for (uint256 i; i < n; ++i) {
            VoucherClaim calldata vc = voucherClaims[i];
            bytes32 channelId = _channelId(vc.voucher.channel);
            if (msg.sender != vc.voucher.channel.receiverAuthorizer) {
                revert NotReceiverAuthorizer(channelId, msg.sender);
            }
            _claimOne(vc, channelId);
        }
    }

    /// @inheritdoc IBatchSettlement
    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature)
        external
        nonReentrant
    {
        uint256 n = voucherClaims.length;
        if (n == 0) revert EmptyClaimBatch();
        address authorizer = voucherClaims[0].voucher.channel.receiverAuthorizer;
        bytes32[] memory ids = _channelIds(voucherClaims);
        for (uint256 i; i < n; ++i) {
            if (voucherClaims[i].voucher.channel.receiverAuthorizer != authorizer) {
                revert NotReceiverAuthorizer(ids[i], authorizer);
            }
        }
        bytes32 digest = _claimBatchDigest(voucherClaims, ids);
        if (!SignatureChecker.isValidSignatureNowCalldata(authorizer, digest, authorizerSignature)) {
            revert InvalidAuthorizerSignature(authorizer);
        }
        for (uint256 i; i < n; ++i) {
            _claimOne(voucherClaims[i], ids[i]);
        }
    }

    function _claimOne(VoucherClaim calldata vc, bytes32 channelId) internal {
        ChannelState storage c = channels[channelId];
        (uint128 balance, uint128 claimed) = (c.balance, c.totalClaimed);
        uint128 total = vc.totalClaimed;
        if (total <= claimed) {
            emit ClaimSkipped(channelId, total, claimed);
            return;
        }
        uint128 maxClaimable = vc.voucher.maxClaimableAmount;
        if (total > maxClaimable) revert ClaimExceedsVoucher(channelId, total, maxClaimable);
        if (total > balance) revert ClaimExceedsBalance(channelId, total, balance);
        ChannelConfig calldata config = vc.voucher.channel;
        if (!_validVoucherSignature(config, channelId, maxClaimable, vc.signature)) {
            revert InvalidVoucherSignature(channelId);
        }

        c.totalClaimed = total;
        uint128 amount;
        // total > claimed was checked above.
        unchecked {
            amount = total - claimed;
        }
        receivers[config.receiver][config.token].totalClaimed += amount;
        emit Claimed(channelId, config.receiver, config.token, amount, total);
    }

    /// @inheritdoc IBatchSettlement
    function settle(address receiver, address token) external nonReentrant {
        ReceiverState storage r = receivers[receiver][token];
        uint128 claimed = r.totalClaimed;
        uint128 amount = claimed - r.totalSettled;
        if (amount == 0) return;
        r.totalSettled = claimed;
        IERC20(token).safeTransfer(receiver, amount);
        emit Settled(receiver, token, msg.sender, amount);
    }

    // ---------------------------------------------------------------- withdrawal

    /// @inheritdoc IBatchSettlement
    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        bytes32 channelId = _channelId(config);
        _requirePayer(config, channelId);
        if (amount == 0) revert ZeroAmount();
        uint40 initiatedAt = SafeCast.toUint40(block.timestamp);
        pendingWithdrawals[channelId] = PendingWithdrawal(amount, initiatedAt);
        emit WithdrawInitiated(channelId, config.payer, amount, uint256(initiatedAt) + config.withdrawDelay);
    }

    /// @inheritdoc IBatchSettlement
    function finalizeWithdraw(ChannelConfig calldata config) external nonReentrant {
        bytes32 channelId = _channelId(config);
        _requirePayer(config, channelId);
        PendingWithdrawal memory w = pendingWithdrawals[channelId];
        if (w.initiatedAt == 0) revert NoPendingWithdrawal(channelId);
        uint256 withdrawableAt = uint256(w.initiatedAt) + config.withdrawDelay;
        if (block.timestamp < withdrawableAt) {
            revert WithdrawDelayNotElapsed(channelId, withdrawableAt, block.timestamp);
        }

        ChannelState storage c = channels[channelId];
        uint128 balance = c.balance;
        // What the receiver claimed during the delay stays its own: only the unclaimed rest can leave.
        uint128 unclaimed = balance - c.totalClaimed;
        uint128 amount = w.amount < unclaimed ? w.amount : unclaimed;
        c.balance = balance - amount;
        delete pendingWithdrawals[channelId];
        if (amount != 0) IERC20(config.token).safeTransfer(config.payer, amount);
        emit WithdrawFinalized(channelId, config.payer, amount);
    }

    // ---------------------------------------------------------------- refund

    /// @inheritdoc IBatchSettlement
    function refund(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        bytes32 channelId = _channelId(config);
        if (msg.sender != config.receiverAuthorizer) revert NotReceiverAuthorizer(channelId, msg.sender);
        _refund(config, channelId, amount);
    }

    /// @inheritdoc IBatchSettlement
    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external nonReentrant {
        bytes32 channelId = _channelId(config);
        uint256 expected = refundNonce[channelId];
        if (nonce != expected) revert InvalidRefundNonce(channelId, expected, nonce);
        address authorizer = config.receiverAuthorizer;
        bytes32 digest = _refundDigest(channelId, nonce, amount);
        if (!SignatureChecker.isValidSignatureNowCalldata(authorizer, digest, receiverAuthorizerSignature)) {
            revert InvalidAuthorizerSignature(authorizer);
        }
        _refund(config, channelId, amount);
    }

    function _refund(ChannelConfig calldata config, bytes32 channelId, uint128 amount) internal {
        if (amount == 0) revert ZeroAmount();
        ChannelState storage c = channels[channelId];
        uint128 balance = c.balance;
        uint128 unclaimed = balance - c.totalClaimed;
        uint128 refunded = amount < unclaimed ? amount : unclaimed;
        if (refunded == 0) revert NothingToRefund(channelId);
        c.balance = balance - refunded;
        uint256 nonce = refundNonce[channelId]++;

        // A refund pays the payer what it asked to withdraw, so it counts against the pending request; the request
        // ends once covered or once nothing unclaimed is left, and otherwise keeps its clock.
        uint128 withdrawalLeft;
        PendingWithdrawal storage w = pendingWithdrawals[channelId];
        if (w.initiatedAt != 0) {
            if (w.amount > refunded && unclaimed > refunded) {
                // w.amount > refunded was checked on the line above.
                unchecked {
                    withdrawalLeft = w.amount - refunded;
                }
                w.amount = withdrawalLeft;
            } else {
                delete pendingWithdrawals[channelId];
            }
        }
        IERC20(config.token).safeTransfer(config.payer, refunded);
        emit Refunded(channelId, config.payer, refunded, nonce, withdrawalLeft);
    }

    // ---------------------------------------------------------------- views

    /// @inheritdoc IBatchSettlement
    function getChannelId(ChannelConfig calldata config) external view returns (bytes32) {
        return _channelId(config);
    }

    /// @inheritdoc IBatchSettlement
    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) external view returns (bytes32) {
        return _voucherDigest(channelId, maxClaimableAmount);
    }

    /// @inheritdoc IBatchSettlement
    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) external view returns (bytes32) {
        return _refundDigest(channelId, nonce, amount);
    }

    /// @inheritdoc IBatchSettlement
    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) external view returns (bytes32) {
        return _claimBatchDigest(voucherClaims, _channelIds(voucherClaims));
    }

    // ---------------------------------------------------------------- internals

    function _checkConfig(ChannelConfig calldata config) internal pure {
        if (
            config.payer == address(0) || config.receiver == address(0) || config.receiverAuthorizer == address(0)
                || config.token == address(0)
        ) revert ZeroAddress();
        uint40 delay = config.withdrawDelay;
        if (delay < MIN_WITHDRAW_DELAY || delay > MAX_WITHDRAW_DELAY) revert WithdrawDelayOutOfRange(delay);
    }

    function _requirePayer(ChannelConfig calldata config, bytes32 channelId) internal view {
        address payerAuthorizer = config.payerAuthorizer;
        if (msg.sender != config.payer && (payerAuthorizer == address(0) || msg.sender != payerAuthorizer)) {
            revert NotPayer(channelId, msg.sender);
        }
    }

    function _channelId(ChannelConfig calldata config) internal view returns (bytes32) {
        // Every field is static, so abi.encode lays the struct out as EIP-712's encodeData: one word per field.
        return _hashTypedDataV4(keccak256(abi.encode(CHANNEL_CONFIG_TYPEHASH, config)));
    }

    function _channelIds(VoucherClaim[] calldata voucherClaims) internal view returns (bytes32[] memory ids) {
        ids = new bytes32[](voucherClaims.length);
        for (uint256 i; i < ids.length; ++i) {
            ids[i] = _channelId(voucherClaims[i].voucher.channel);
        }
    }

    function _voucherDigest(bytes32 channelId, uint128 maxClaimableAmount) internal view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, maxClaimableAmount)));
    }

    function _refundDigest(bytes32 channelId, uint256 nonce, uint128 amount) internal view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(REFUND_TYPEHASH, channelId, nonce, amount)));
    }

    function _claimBatchDigest(VoucherClaim[] calldata voucherClaims, bytes32[] memory ids)
        internal
        view
        returns (bytes32)
    {
        bytes32[] memory entries = new bytes32[](ids.length);
        for (uint256 i; i < ids.length; ++i) {
            VoucherClaim calldata vc = voucherClaims[i];
            entries[i] =
                keccak256(abi.encode(CLAIM_ENTRY_TYPEHASH, ids[i], vc.voucher.maxClaimableAmount, vc.totalClaimed));
        }
        // EIP-712 hashes an array as the keccak of its elements' hashStructs laid end to end.
        return _hashTypedDataV4(keccak256(abi.encode(CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
    }

    /// @dev A payerAuthorizer is a signing key (plain ECDSA, as x402 facilitators verify it off-chain); without one,
    /// the payer signs itself, as an EOA or through ERC-1271 when it is a contract.
    function _validVoucherSignature(
        ChannelConfig calldata config,
        bytes32 channelId,
        uint128 maxClaimableAmount,
        bytes calldata signature
    ) internal view returns (bool) {
        bytes32 digest = _voucherDigest(channelId, maxClaimableAmount);
        address payerAuthorizer = config.payerAuthorizer;
        if (payerAuthorizer != address(0)) {
            (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecoverCalldata(digest, signature);
            return err == ECDSA.RecoverError.NoError && signer == payerAuthorizer;
        }
        return SignatureChecker.isValidSignatureNowCalldata(config.payer, digest, signature);
    }
}
