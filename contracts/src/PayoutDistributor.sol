// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {IPayoutDistributor} from "./interfaces/IPayoutDistributor.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {FeeSplit} from "./libraries/FeeSplit.sol";

/// @title Epoch payouts by Merkle root of cumulative provider earnings.
/// @notice Behaviour, errors and events are documented on IPayoutDistributor.
contract PayoutDistributor is IPayoutDistributor, AccessControl {
    using SafeERC20 for IERC20;
    using SafeCast for uint256;

    bytes32 public constant OPERATOR_ROLE = keccak256("OPERATOR_ROLE");
    /// @notice How long a replaced root still proves claims.
    uint256 public constant PREVIOUS_ROOT_GRACE = 1 days;

    IERC20 public immutable token;
    /// @inheritdoc IPayoutDistributor
    address public immutable treasury;
    /// @inheritdoc IPayoutDistributor
    bytes32 public merkleRoot;
    /// @inheritdoc IPayoutDistributor
    bytes32 public previousRoot;

    // A root post reads and writes this one slot (besides the roots). 96 bits hold 7.9e28 base units: 7.9e22
    // dollars of a 6-decimal token, 7.9e10 tokens of an 18-decimal one. SafeCast reverts beyond that. 32 bits
    // of seconds last until 2106.
    uint96 internal _providerTotal;
    uint96 internal _feesPaid;
    uint32 internal _epoch;
    uint32 internal _previousRootUntil;
    uint256 internal _totalClaimed;

    mapping(address provider => uint256 amount) public claimed;

    constructor(IERC20 token_, address treasury_, address admin) {
        if (address(token_) == address(0) || treasury_ == address(0) || admin == address(0)) revert ZeroAddress();
        token = token_;
        treasury = treasury_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @inheritdoc IPayoutDistributor
    function postRoot(uint256 epoch_, bytes32 root, uint256 providerTotal_) external onlyRole(OPERATOR_ROLE) {
        uint256 expected = uint256(_epoch) + 1;
        if (epoch_ != expected) revert EpochOutOfOrder(expected, epoch_);
        uint256 previousTotal = _providerTotal;
        if (providerTotal_ < previousTotal) revert ProviderTotalDecreased(previousTotal, providerTotal_);
        uint256 feesPaid_ = _feesPaid;
        uint256 funded_ = token.balanceOf(address(this)) + feesPaid_ + _totalClaimed;
        uint256 pool = FeeSplit.providerShare(funded_);
        if (providerTotal_ > pool) revert ProviderTotalExceedsPool(providerTotal_, pool);

        uint256 fees = funded_ - pool;
        previousRoot = merkleRoot;
        merkleRoot = root;
        uint32 graceUntil = (block.timestamp + PREVIOUS_ROOT_GRACE).toUint32();
        (_providerTotal, _feesPaid, _epoch, _previousRootUntil) =
        (providerTotal_.toUint96(), fees.toUint96(), epoch_.toUint32(), graceUntil);
        // fees only grow: funded never shrinks (payouts count in it), and the pool is a fixed share of it.
        uint256 feeDue = fees - feesPaid_;
        if (feeDue != 0) token.safeTransfer(treasury, feeDue);
        emit RootPosted(epoch_, root, providerTotal_, funded_, feeDue);
    }

    /// @inheritdoc IPayoutDistributor
    function claim(address provider, uint256 cumulativeAmount, bytes32[] calldata proof, bytes32 expectedRoot)
        external
        returns (uint256 amount)
    {
        bytes32 root = merkleRoot;
        if (expectedRoot != root) {
            // The replaced root, within its grace: zero (no root before) proves nothing and is refused by name.
            if (expectedRoot != previousRoot || expectedRoot == bytes32(0) || block.timestamp >= _previousRootUntil) {
                revert StaleRoot(expectedRoot, root);
            }
            root = expectedRoot;
        }
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
        _totalClaimed += amount;
        token.safeTransfer(provider, amount);
        emit Claimed(provider, msg.sender, amount, cumulativeAmount);
    }

    /// @inheritdoc IPayoutDistributor
    function providerPool(uint256 funded_) external pure returns (uint256) {
        return FeeSplit.providerShare(funded_);
    }

    /// @inheritdoc IPayoutDistributor
    function funded() external view returns (uint256) {
        return token.balanceOf(address(this)) + _feesPaid + _totalClaimed;
    }

    /// @inheritdoc IPayoutDistributor
    function previousRootValidUntil() external view returns (uint256) {
        return _previousRootUntil;
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
