// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {IStakeManager} from "./interfaces/IStakeManager.sol";

/// @title Provider stake: bonded, unbonding, slashable.
/// @notice Behaviour, errors and events are documented on IStakeManager.
contract StakeManager is IStakeManager, AccessControl {
    using SafeERC20 for IERC20;
    using SafeCast for uint256;

    bytes32 public constant SLASHER_ROLE = keccak256("SLASHER_ROLE");
    uint256 internal constant BPS = 10_000;

    IERC20 public immutable token;
    /// @inheritdoc IStakeManager
    address public immutable treasury;
    /// @inheritdoc IStakeManager
    uint256 public immutable unbondingPeriod;
    /// @inheritdoc IStakeManager
    uint256 public immutable challengerBps;
    /// @inheritdoc IStakeManager
    uint256 public minStake;
    /// @inheritdoc IStakeManager
    uint256 public totalStaked;
    /// @inheritdoc IStakeManager
    uint256 public totalUnbonding;

    mapping(address provider => Stake) internal _stakes;
    mapping(bytes32 evidenceHash => bool) public evidenceUsed;

    constructor(
        IERC20 token_,
        address treasury_,
        address admin,
        uint256 minStake_,
        uint256 unbondingPeriod_,
        uint256 challengerBps_
    ) {
        if (address(token_) == address(0) || treasury_ == address(0) || admin == address(0)) revert ZeroAddress();
        if (challengerBps_ > BPS) revert InvalidBasisPoints(challengerBps_);
        token = token_;
        treasury = treasury_;
        unbondingPeriod = unbondingPeriod_;
        challengerBps = challengerBps_;
        minStake = minStake_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @inheritdoc IStakeManager
    function stake(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        Stake storage s = _stakes[msg.sender];
        uint256 staked = s.staked + amount;
        if (staked < minStake) revert StakeBelowMinimum(msg.sender, staked, minStake);
        s.staked = staked.toUint128();
        totalStaked += amount;
        token.safeTransferFrom(msg.sender, address(this), amount);
        emit Staked(msg.sender, amount, staked);
    }

    /// @inheritdoc IStakeManager
    function requestUnstake(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        Stake storage s = _stakes[msg.sender];
        if (amount > s.staked) revert UnstakeExceedsStake(msg.sender, amount, s.staked);
        uint128 moved = amount.toUint128();
        uint256 unbondsAt = block.timestamp + unbondingPeriod;
        // Bounded by the check above, and staked + unbonding never exceeds the tokens this contract holds.
        unchecked {
            s.staked -= moved;
            s.unbonding += moved;
            totalStaked -= amount;
            totalUnbonding += amount;
        }
        s.unbondsAt = unbondsAt.toUint64();
        emit UnstakeRequested(msg.sender, amount, s.unbonding, unbondsAt);
    }

    /// @inheritdoc IStakeManager
    function withdraw() external returns (uint256 amount) {
        Stake storage s = _stakes[msg.sender];
        amount = s.unbonding;
        if (amount == 0) revert NothingToWithdraw(msg.sender);
        if (block.timestamp < s.unbondsAt) revert UnbondingNotFinished(msg.sender, s.unbondsAt, block.timestamp);
        s.unbonding = 0;
        s.unbondsAt = 0;
        totalUnbonding -= amount;
        token.safeTransfer(msg.sender, amount);
        emit Withdrawn(msg.sender, amount);
    }

    /// @inheritdoc IStakeManager
    function slash(address provider, uint256 amount, bytes32 evidenceHash)
        external
        onlyRole(SLASHER_ROLE)
        returns (uint256 slashed)
    {
        if (amount == 0) revert ZeroAmount();
        if (evidenceUsed[evidenceHash]) revert EvidenceAlreadyUsed(evidenceHash);
        Stake storage s = _stakes[provider];
        // Each part is capped at the balance it comes from, so it fits in that balance's 128 bits.
        uint128 fromStaked = uint128(Math.min(amount, s.staked));
        uint128 fromUnbonding = uint128(Math.min(amount - fromStaked, s.unbonding));
        slashed = uint256(fromStaked) + fromUnbonding;
        if (slashed == 0) revert NothingToSlash(provider);
        evidenceUsed[evidenceHash] = true;
        // Each part is capped at the balance it comes from, just above.
        unchecked {
            s.staked -= fromStaked;
            s.unbonding -= fromUnbonding;
            totalStaked -= fromStaked;
            totalUnbonding -= fromUnbonding;
        }
        uint256 challengerShare = slashed * challengerBps / BPS;
        if (challengerShare != 0) token.safeTransfer(msg.sender, challengerShare);
        if (slashed != challengerShare) token.safeTransfer(treasury, slashed - challengerShare);
        emit Slashed(provider, msg.sender, evidenceHash, slashed, challengerShare);
    }

    /// @inheritdoc IStakeManager
    function setMinStake(uint256 newMinStake) external onlyRole(DEFAULT_ADMIN_ROLE) {
        emit MinStakeChanged(minStake, newMinStake);
        minStake = newMinStake;
    }

    /// @inheritdoc IStakeManager
    function isActive(address provider) external view returns (bool) {
        uint256 staked = _stakes[provider].staked;
        return staked != 0 && staked >= minStake;
    }

    /// @inheritdoc IStakeManager
    function stakeOf(address provider) external view returns (Stake memory) {
        return _stakes[provider];
    }
}
