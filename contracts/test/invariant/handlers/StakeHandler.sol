// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Vm} from "../../utils/Vm.sol";
import {Bound} from "../../utils/Bound.sol";
import {PaymentToken} from "../../../src/PaymentToken.sol";
import {StakeManager} from "../../../src/StakeManager.sol";
import {IStakeManager} from "../../../src/interfaces/IStakeManager.sol";

/// @notice Drives StakeManager: providers stake, unstake and withdraw, the validator slashes, the admin moves the
/// minimum. Ghost variables track every token in and out; `ghost_mismatches` counts results the model did not expect.
contract StakeHandler {
    using Bound for uint256;

    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));
    uint256 internal constant MAX_TOP_UP = 10_000e6;

    PaymentToken internal immutable token;
    StakeManager internal immutable stakeManager;
    address internal immutable tokenOwner;
    address internal immutable admin;
    address internal immutable validator;
    address[] internal _providers;

    uint256 public currentTime;
    uint256 internal _evidenceNonce;

    uint256 public ghost_staked;
    uint256 public ghost_withdrawn;
    uint256 public ghost_slashed;
    uint256 public ghost_challengerPaid;
    uint256 public ghost_mismatches;

    constructor(
        PaymentToken token_,
        StakeManager stakeManager_,
        address tokenOwner_,
        address admin_,
        address validator_,
        address[] memory providers_
    ) {
        token = token_;
        stakeManager = stakeManager_;
        tokenOwner = tokenOwner_;
        admin = admin_;
        validator = validator_;
        _providers = providers_;
        currentTime = block.timestamp;
        for (uint256 i; i < providers_.length; ++i) {
            vm.prank(providers_[i]);
            token_.approve(address(stakeManager_), type(uint256).max);
        }
    }

    function providers() external view returns (address[] memory) {
        return _providers;
    }

    // ---------------------------------------------------------------- actions

    function warp(uint256 seconds_) external {
        currentTime += seconds_.bound(0, 3 days);
        vm.warp(currentTime);
    }

    function stake(uint256 providerSeed, uint256 amount) external {
        vm.warp(currentTime);
        address provider = _providers[providerSeed % _providers.length];
        uint256 staked = stakeManager.stakeOf(provider).staked;
        uint256 minStake = stakeManager.minStake();
        uint256 lowest = staked >= minStake ? 1 : minStake - staked;
        amount = amount.bound(lowest, lowest + MAX_TOP_UP);
        if (token.balanceOf(provider) < amount) {
            vm.prank(tokenOwner);
            token.mint(provider, amount);
        }
        vm.prank(provider);
        stakeManager.stake(amount);
        if (stakeManager.stakeOf(provider).staked != staked + amount) ++ghost_mismatches;
        ghost_staked += amount;
    }

    function requestUnstake(uint256 providerSeed, uint256 amount) external {
        vm.warp(currentTime);
        address provider = _providers[providerSeed % _providers.length];
        IStakeManager.Stake memory s = stakeManager.stakeOf(provider);
        if (s.staked == 0) return;
        amount = amount.bound(1, s.staked);
        vm.prank(provider);
        stakeManager.requestUnstake(amount);
        IStakeManager.Stake memory after_ = stakeManager.stakeOf(provider);
        if (after_.unbonding != s.unbonding + amount) ++ghost_mismatches;
        if (after_.unbondsAt != currentTime + stakeManager.unbondingPeriod()) ++ghost_mismatches;
    }

    /// @notice Withdraws, first trying too early (which must fail) and then waiting out the period.
    function withdraw(uint256 providerSeed) external {
        vm.warp(currentTime);
        address provider = _providers[providerSeed % _providers.length];
        IStakeManager.Stake memory s = stakeManager.stakeOf(provider);
        if (s.unbonding == 0) return;
        if (currentTime < s.unbondsAt) {
            vm.prank(provider);
            try stakeManager.withdraw() {
                ++ghost_mismatches;
            } catch {}
            currentTime = s.unbondsAt;
            vm.warp(currentTime);
        }
        uint256 before = token.balanceOf(provider);
        vm.prank(provider);
        uint256 amount = stakeManager.withdraw();
        if (amount != s.unbonding || token.balanceOf(provider) != before + amount) ++ghost_mismatches;
        ghost_withdrawn += amount;
    }

    /// @notice The validator slashes up to twice what the provider has, with fresh evidence.
    function slash(uint256 providerSeed, uint256 amount) external {
        vm.warp(currentTime);
        address provider = _providers[providerSeed % _providers.length];
        IStakeManager.Stake memory s = stakeManager.stakeOf(provider);
        uint256 available = uint256(s.staked) + s.unbonding;
        if (available == 0) return;
        amount = amount.bound(1, 2 * available);
        bytes32 evidence = keccak256(abi.encode("evidence", ++_evidenceNonce));
        address treasury = stakeManager.treasury();
        uint256 validatorBefore = token.balanceOf(validator);
        uint256 treasuryBefore = token.balanceOf(treasury);

        vm.prank(validator);
        uint256 slashed = stakeManager.slash(provider, amount, evidence);

        uint256 expected = amount < available ? amount : available;
        uint256 share = expected * stakeManager.challengerBps() / 10_000;
        if (slashed != expected) ++ghost_mismatches;
        if (token.balanceOf(validator) != validatorBefore + share) ++ghost_mismatches;
        if (token.balanceOf(treasury) != treasuryBefore + expected - share) ++ghost_mismatches;
        // A second use of the same evidence must fail.
        vm.prank(validator);
        try stakeManager.slash(provider, 1, evidence) {
            ++ghost_mismatches;
        } catch {}
        ghost_slashed += slashed;
        ghost_challengerPaid += share;
    }

    function setMinStake(uint256 minStake) external {
        vm.prank(admin);
        stakeManager.setMinStake(minStake.bound(0, 500e6));
    }
}
