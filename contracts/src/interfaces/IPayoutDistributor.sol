// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

/// @title Epoch payouts to providers by Merkle root of cumulative earnings.
/// @notice Holds what VoucherEscrow redeems into it. Each epoch the operator posts one root over leaves
/// `(provider, cumulativeAmount)` (OpenZeppelin's double-hashed standard leaf) with the epoch's provider total.
/// Of everything the contract ever received (`funded()`: its balance plus all it paid out), providers may be
/// promised at most 80%, and the platform receives the rest, sent to the treasury as roots are posted. Anyone
/// may claim for a provider; the provider receives its cumulative amount minus what it already claimed.
///
/// Funding is read from the token balance rather than reported by the escrow, so the two contracts need no
/// reference to each other beyond the escrow's payee, and a root post makes no cross-contract call. A token
/// transfer straight to this contract counts as funding like a redemption does.
///
/// A claim names the root it was proven against. The root before the current one stays good for
/// `PREVIOUS_ROOT_GRACE` after it is replaced, so a claim sent just before a post still lands. That is safe because
/// leaves are cumulative and only grow: an older leaf pays at most what a newer one would.
///
/// Rounding: the providers' pool is `funded * 8000 / 10000` rounded down, and the platform's cumulative fee is
/// `funded - pool`, so the platform's share is 20% rounded up, by less than one base unit in aggregate.
interface IPayoutDistributor {
    error ZeroAddress();
    error EpochOutOfOrder(uint256 expected, uint256 given);
    error ProviderTotalDecreased(uint256 previous, uint256 posted);
    error ProviderTotalExceedsPool(uint256 posted, uint256 pool);
    error StaleRoot(bytes32 expected, bytes32 current);
    error InvalidProof(address provider, uint256 cumulativeAmount);
    error NothingToClaim(address provider, uint256 cumulativeAmount, uint256 claimed);
    error ClaimExceedsProviderTotal(address provider, uint256 amount, uint256 remaining);

    event RootPosted(
        uint256 indexed epoch, bytes32 indexed root, uint256 providerTotal, uint256 funded, uint256 feePaid
    );
    event Claimed(address indexed provider, address indexed caller, uint256 amount, uint256 cumulativeAmount);

    /// @notice Posts epoch `epoch`'s root and pays the platform fee newly due. Only OPERATOR_ROLE.
    /// @param epoch Must be the current epoch plus one, so a retried post cannot land twice.
    /// @param root Merkle root over `(provider, cumulativeAmount)` leaves.
    /// @param providerTotal The sum of the tree's cumulative amounts; never decreases; at most the pool.
    function postRoot(uint256 epoch, bytes32 root, uint256 providerTotal) external;

    /// @notice Pays `provider` its `cumulativeAmount` minus what it already claimed, proven against `expectedRoot`:
    /// the current root, or the one before it until `previousRootValidUntil()`.
    function claim(address provider, uint256 cumulativeAmount, bytes32[] calldata proof, bytes32 expectedRoot)
        external
        returns (uint256 amount);

    /// @notice The providers' share of `funded`: 80%, rounded down.
    function providerPool(uint256 funded) external pure returns (uint256);

    /// @notice Everything this contract ever received: its balance plus fees and claims paid out.
    function funded() external view returns (uint256);

    function merkleRoot() external view returns (bytes32);

    /// @notice The root the current one replaced; zero before the second post.
    function previousRoot() external view returns (bytes32);

    /// @notice Until when (exclusive) claims against `previousRoot()` are accepted.
    function previousRootValidUntil() external view returns (uint256);

    function epoch() external view returns (uint256);

    /// @notice Sum of the current root's cumulative amounts.
    function providerTotal() external view returns (uint256);

    /// @notice Platform fees sent to the treasury so far.
    function feesPaid() external view returns (uint256);

    function claimed(address provider) external view returns (uint256);

    /// @notice Everything ever claimed by every provider.
    function totalClaimed() external view returns (uint256);

    function treasury() external view returns (address);
}
