// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {IPayoutDistributor} from "./interfaces/IPayoutDistributor.sol";
import {IVoucherEscrow} from "./interfaces/IVoucherEscrow.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {FeeSplit} from "./libraries/FeeSplit.sol";

/// @title Epoch payouts by Merkle root of cumulative provider earnings.
/// @notice Behaviour, errors and events are documented on IPayoutDistributor.
contract PayoutDistributor is IPayoutDistributor, AccessControl {
    using SafeERC20 for IERC20;
    using SafeCast for uint256;

    bytes32 public constant OPERATOR_ROLE = keccak256("OPERATOR_ROLE");

    IERC20 public immutable token;
    /// @inheritdoc IPayoutDistributor
    address public immutable treasury;
    /// @inheritdoc IPayoutDistributor
    address public escrow;
    /// @inheritdoc IPayoutDistributor
    bytes32 public merkleRoot;

    // Packed by when they are used: a claim reads and writes the first pair, a post the second. 128 bits is far
    // beyond any token supply.
    uint128 internal _providerTotal;
    uint128 internal _totalClaimed;
    uint128 internal _feesPaid;
    uint64 internal _epoch;

    mapping(address provider => uint256 amount) public claimed;

    constructor(IERC20 token_, address treasury_, address admin) {
        if (address(token_) == address(0) || treasury_ == address(0) || admin == address(0)) revert ZeroAddress();
        token = token_;
        treasury = treasury_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @inheritdoc IPayoutDistributor
    function bindEscrow(address escrow_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (escrow_ == address(0)) revert ZeroAddress();
        if (escrow != address(0)) revert EscrowAlreadyBound(escrow);
        escrow = escrow_;
        emit EscrowBound(escrow_);
    }

    /// @inheritdoc IPayoutDistributor
    function postRoot(uint256 epoch_, bytes32 root, uint256 providerTotal_, uint256 redeemedTotal)
        external
        onlyRole(OPERATOR_ROLE)
    {
        address escrow_ = escrow;
        if (escrow_ == address(0)) revert EscrowNotBound();
        if (epoch_ != uint256(_epoch) + 1) revert EpochOutOfOrder(uint256(_epoch) + 1, epoch_);
        uint256 redeemed = IVoucherEscrow(escrow_).totalRedeemed();
        if (redeemedTotal != redeemed) revert RedeemedTotalMismatch(redeemedTotal, redeemed);
        if (providerTotal_ < _providerTotal) revert ProviderTotalDecreased(_providerTotal, providerTotal_);
        uint256 pool = FeeSplit.providerShare(redeemed);
        if (providerTotal_ > pool) revert ProviderTotalExceedsPool(providerTotal_, pool);

        uint256 feeDue = (redeemed - pool) - _feesPaid;
        merkleRoot = root;
        _epoch = epoch_.toUint64();
        _providerTotal = providerTotal_.toUint128();
        _feesPaid = (redeemed - pool).toUint128();
        if (feeDue != 0) token.safeTransfer(treasury, feeDue);
        emit RootPosted(epoch_, root, providerTotal_, redeemed, feeDue);
    }

    /// @inheritdoc IPayoutDistributor
    function claim(address provider, uint256 cumulativeAmount, bytes32[] calldata proof, bytes32 expectedRoot)
        external
        returns (uint256 amount)
    {
        bytes32 root = merkleRoot;
        if (expectedRoot != root) revert StaleRoot(expectedRoot, root);
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(provider, cumulativeAmount))));
        if (!MerkleProof.verifyCalldata(proof, root, leaf)) revert InvalidProof(provider, cumulativeAmount);
        uint256 already = claimed[provider];
        if (cumulativeAmount <= already) revert NothingToClaim(provider, cumulativeAmount, already);
        // cumulativeAmount > already was checked above.
        unchecked {
            amount = cumulativeAmount - already;
        }
        // A tree whose leaves add up to more than its posted total cannot pay out more than that total.
        uint256 remaining = _providerTotal - _totalClaimed;
        if (amount > remaining) revert ClaimExceedsProviderTotal(provider, amount, remaining);
        claimed[provider] = cumulativeAmount;
        _totalClaimed += amount.toUint128();
        token.safeTransfer(provider, amount);
        emit Claimed(provider, msg.sender, amount, cumulativeAmount);
    }

    /// @inheritdoc IPayoutDistributor
    function providerPool(uint256 redeemed) external pure returns (uint256) {
        return FeeSplit.providerShare(redeemed);
    }

    /// @inheritdoc IPayoutDistributor
    function epoch() external view returns (uint256) {
        return _epoch;
    }

    /// @inheritdoc IPayoutDistributor
    function providerTotal() external view returns (uint256) {
        return _providerTotal;
    }

    /// @inheritdoc IPayoutDistributor
    function feesPaid() external view returns (uint256) {
        return _feesPaid;
    }

    /// @inheritdoc IPayoutDistributor
    function totalClaimed() external view returns (uint256) {
        return _totalClaimed;
    }
}
