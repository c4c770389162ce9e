// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/// @title Provider stake: bonded, unbonding, slashable.
/// @notice Providers bond PaymentToken to be matchable. Unstaking starts an unbonding period during which the
/// stake can still be slashed; only then can it be withdrawn. A slasher (the validator) takes stake with an
/// evidence hash, and the slashed amount is split between the challenger and the treasury.
interface IStakeManager {
    /// @notice A provider's stake. `staked` counts towards activity; `unbonding` waits for `unbondsAt`.
    struct Stake {
        uint128 staked;
        uint128 unbonding;
        uint64 unbondsAt;
    }

    error ZeroAmount();
    error ZeroAddress();
    error InvalidBasisPoints(uint256 bps);
    error StakeBelowMinimum(address provider, uint256 staked, uint256 minimum);
    error UnstakeExceedsStake(address provider, uint256 amount, uint256 staked);
    error UnbondingNotFinished(address provider, uint256 unbondsAt, uint256 timestamp);
    error NothingToWithdraw(address provider);
    error NothingToSlash(address provider);
    error EvidenceAlreadyUsed(bytes32 evidenceHash);

    event Staked(address indexed provider, uint256 amount, uint256 staked);
    event UnstakeRequested(address indexed provider, uint256 amount, uint256 unbonding, uint256 unbondsAt);
    event Withdrawn(address indexed provider, uint256 amount);
    event Slashed(
        address indexed provider,
        address indexed challenger,
        bytes32 indexed evidenceHash,
        uint256 amount,
        uint256 challengerShare
    );
    event MinStakeChanged(uint256 previous, uint256 current);

    /// @notice Bonds `amount` more of the caller's tokens (pulled with transferFrom).
    /// @dev Reverts with StakeBelowMinimum when the resulting bonded stake is under `minStake()`.
    function stake(uint256 amount) external;

    /// @notice Moves `amount` of bonded stake into unbonding and restarts the unbonding clock.
    /// @dev Restarting the clock keeps every unbonding token slashable for a full period after its request.
    function requestUnstake(uint256 amount) external;

    /// @notice Sends the caller its whole unbonding balance once the unbonding period has passed.
    function withdraw() external returns (uint256 amount);

    /// @notice Takes up to `amount` from `provider`, bonded stake first, then unbonding stake.
    /// @dev Only SLASHER_ROLE. The caller is the challenger and receives `challengerBps` of what was taken (rounded
    /// down); the treasury receives the rest. Each evidence hash can be used once.
    /// @return slashed What was actually taken: `amount` capped at the provider's bonded plus unbonding stake.
    function slash(address provider, uint256 amount, bytes32 evidenceHash) external returns (uint256 slashed);

    /// @notice Changes the minimum bonded stake for activity. Only the admin.
    function setMinStake(uint256 newMinStake) external;

    /// @notice Whether `provider` has at least `minStake()` bonded (unbonding stake does not count).
    function isActive(address provider) external view returns (bool);

    function stakeOf(address provider) external view returns (Stake memory);

    function minStake() external view returns (uint256);

    /// @notice Unbonding period, in seconds.
    function unbondingPeriod() external view returns (uint256);

    /// @notice The challenger's share of a slash, in basis points.
    function challengerBps() external view returns (uint256);

    function treasury() external view returns (address);

    function totalStaked() external view returns (uint256);

    function totalUnbonding() external view returns (uint256);
}
