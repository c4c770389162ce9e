// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Base} from "./Base.t.sol";
import {StakeManager} from "../src/StakeManager.sol";
import {IStakeManager} from "../src/interfaces/IStakeManager.sol";
import {IAccessControl} from "@openzeppelin/contracts/access/IAccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

contract StakeManagerTest is Base {
    bytes32 internal constant EVIDENCE = keccak256("double-answer evidence");

    function _requestUnstake(address provider, uint256 amount) internal {
        vm.prank(provider);
        stakeManager.requestUnstake(amount);
    }

    function _slash(address provider, uint256 amount, bytes32 evidence) internal returns (uint256) {
        vm.prank(validator);
        return stakeManager.slash(provider, amount, evidence);
    }

    function _assertStake(address provider, uint256 staked, uint256 unbonding, uint256 unbondsAt) internal view {
        IStakeManager.Stake memory s = stakeManager.stakeOf(provider);
        assertEq(s.staked, staked, "staked");
        assertEq(s.unbonding, unbonding, "unbonding");
        assertEq(s.unbondsAt, unbondsAt, "unbondsAt");
    }

    /// @dev The contract's balance is exactly what it accounts for.
    function _assertBacked() internal view {
        assertEq(
            token.balanceOf(address(stakeManager)),
            stakeManager.totalStaked() + stakeManager.totalUnbonding(),
            "balance == staked + unbonding"
        );
    }

    // ---------------------------------------------------------------- constructor

    function test_constructor_StoresParameters() public view {
        assertEq(address(stakeManager.token()), address(token), "token");
        assertEq(stakeManager.treasury(), treasury, "treasury");
        assertEq(stakeManager.minStake(), MIN_STAKE, "min stake");
        assertEq(stakeManager.unbondingPeriod(), UNBONDING_PERIOD, "unbonding period");
        assertEq(stakeManager.challengerBps(), CHALLENGER_BPS, "challenger bps");
        assertTrue(stakeManager.hasRole(stakeManager.DEFAULT_ADMIN_ROLE(), admin), "admin");
        assertTrue(stakeManager.hasRole(stakeManager.SLASHER_ROLE(), validator), "slasher");
    }

    function test_RevertWhen_ConstructorGivenZeroToken() public {
        vm.expectRevert(abi.encodeWithSelector(IStakeManager.ZeroAddress.selector));
        new StakeManager(IERC20(address(0)), treasury, admin, MIN_STAKE, UNBONDING_PERIOD, CHALLENGER_BPS);
    }

    function test_RevertWhen_ConstructorGivenZeroTreasury() public {
        vm.expectRevert(abi.encodeWithSelector(IStakeManager.ZeroAddress.selector));
        new StakeManager(token, address(0), admin, MIN_STAKE, UNBONDING_PERIOD, CHALLENGER_BPS);
    }

    function test_RevertWhen_ConstructorGivenZeroAdmin() public {
        vm.expectRevert(abi.encodeWithSelector(IStakeManager.ZeroAddress.selector));
        new StakeManager(token, treasury, address(0), MIN_STAKE, UNBONDING_PERIOD, CHALLENGER_BPS);
    }

    function test_RevertWhen_ConstructorGivenBasisPointsAboveOneHundredPercent() public {
        vm.expectRevert(abi.encodeWithSelector(IStakeManager.InvalidBasisPoints.selector, 10_001));
        new StakeManager(token, treasury, admin, MIN_STAKE, UNBONDING_PERIOD, 10_001);
    }

    // ---------------------------------------------------------------- stake

    function test_stake_BondsTokens() public {
        _fund(providerA, address(stakeManager), MIN_STAKE);
        vm.expectEmit(address(stakeManager));
        emit IStakeManager.Staked(providerA, MIN_STAKE, MIN_STAKE);
        vm.prank(providerA);
        stakeManager.stake(MIN_STAKE);

        _assertStake(providerA, MIN_STAKE, 0, 0);
        assertEq(stakeManager.totalStaked(), MIN_STAKE, "total staked");
        assertEq(token.balanceOf(providerA), 0, "provider paid");
        _assertBacked();
    }

    function test_stake_TopUpBelowMinimumCountsExistingStake() public {
        _stake(providerA, MIN_STAKE);
        _fund(providerA, address(stakeManager), 1);
        vm.expectEmit(address(stakeManager));
        emit IStakeManager.Staked(providerA, 1, MIN_STAKE + 1);
        vm.prank(providerA);
        stakeManager.stake(1);
        _assertStake(providerA, MIN_STAKE + 1, 0, 0);
    }

    function test_RevertWhen_StakeBelowMinimum() public {
        _fund(providerA, address(stakeManager), MIN_STAKE);
        vm.expectRevert(
            abi.encodeWithSelector(IStakeManager.StakeBelowMinimum.selector, providerA, MIN_STAKE - 1, MIN_STAKE)
        );
        vm.prank(providerA);
        stakeManager.stake(MIN_STAKE - 1);
    }

    function test_RevertWhen_StakeZero() public {
        vm.expectRevert(abi.encodeWithSelector(IStakeManager.ZeroAmount.selector));
        vm.prank(providerA);
        stakeManager.stake(0);
    }

    function test_RevertWhen_StakeWithoutAllowance() public {
        _mint(providerA, MIN_STAKE);
        vm.expectRevert(
            abi.encodeWithSelector(
                IERC20Errors.ERC20InsufficientAllowance.selector, address(stakeManager), 0, MIN_STAKE
            )
        );
        vm.prank(providerA);
        stakeManager.stake(MIN_STAKE);
    }

    function test_RevertWhen_StakeOverflowsUint128() public {
        uint256 tooMuch = uint256(type(uint128).max) + 1;
        _fund(providerA, address(stakeManager), tooMuch);
        vm.expectRevert(abi.encodeWithSelector(SafeCast.SafeCastOverflowedUintDowncast.selector, 128, tooMuch));
        vm.prank(providerA);
        stakeManager.stake(tooMuch);
    }

    // ---------------------------------------------------------------- requestUnstake

    function test_requestUnstake_MovesStakeToUnbonding() public {
        _stake(providerA, 300 * USDC);
        uint256 unbondsAt = block.timestamp + UNBONDING_PERIOD;
        vm.expectEmit(address(stakeManager));
        emit IStakeManager.UnstakeRequested(providerA, 100 * USDC, 100 * USDC, unbondsAt);
        _requestUnstake(providerA, 100 * USDC);

        _assertStake(providerA, 200 * USDC, 100 * USDC, unbondsAt);
        assertEq(stakeManager.totalStaked(), 200 * USDC, "total staked");
        assertEq(stakeManager.totalUnbonding(), 100 * USDC, "total unbonding");
        _assertBacked();
    }

    function test_requestUnstake_RestartsClockForAllUnbonding() public {
        _stake(providerA, 300 * USDC);
        _requestUnstake(providerA, 100 * USDC);
        vm.warp(block.timestamp + UNBONDING_PERIOD - 1);

        uint256 unbondsAt = block.timestamp + UNBONDING_PERIOD;
        vm.expectEmit(address(stakeManager));
        emit IStakeManager.UnstakeRequested(providerA, 50 * USDC, 150 * USDC, unbondsAt);
        _requestUnstake(providerA, 50 * USDC);
        _assertStake(providerA, 150 * USDC, 150 * USDC, unbondsAt);

        // The first request's period is over, but the restarted clock holds all of it.
        vm.warp(block.timestamp + 1);
        vm.expectRevert(
            abi.encodeWithSelector(IStakeManager.UnbondingNotFinished.selector, providerA, unbondsAt, block.timestamp)
        );
        vm.prank(providerA);
        stakeManager.withdraw();
    }

    function test_requestUnstake_WholeStakeLeavesProviderInactive() public {
        _stake(providerA, MIN_STAKE);
        _requestUnstake(providerA, MIN_STAKE);
        assertEq(stakeManager.isActive(providerA), false, "inactive");
        _assertStake(providerA, 0, MIN_STAKE, block.timestamp + UNBONDING_PERIOD);
    }

    function test_RevertWhen_RequestUnstakeExceedsStake() public {
        _stake(providerA, MIN_STAKE);
        vm.expectRevert(
            abi.encodeWithSelector(IStakeManager.UnstakeExceedsStake.selector, providerA, MIN_STAKE + 1, MIN_STAKE)
        );
        _requestUnstake(providerA, MIN_STAKE + 1);
    }

    function test_RevertWhen_RequestUnstakeZero() public {
        _stake(providerA, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(IStakeManager.ZeroAmount.selector));
        _requestUnstake(providerA, 0);
    }

    // ---------------------------------------------------------------- withdraw

    function test_withdraw_PaysUnbondingAfterPeriod() public {
        _stake(providerA, 300 * USDC);
        _requestUnstake(providerA, 120 * USDC);
        vm.warp(block.timestamp + UNBONDING_PERIOD);

        vm.expectEmit(address(stakeManager));
        emit IStakeManager.Withdrawn(providerA, 120 * USDC);
        vm.prank(providerA);
        uint256 amount = stakeManager.withdraw();

        assertEq(amount, 120 * USDC, "returned");
        assertEq(token.balanceOf(providerA), 120 * USDC, "paid");
        _assertStake(providerA, 180 * USDC, 0, 0);
        assertEq(stakeManager.totalUnbonding(), 0, "total unbonding");
        _assertBacked();
    }

    function test_RevertWhen_WithdrawBeforeUnbondingPeriodEnds() public {
        _stake(providerA, 300 * USDC);
        _requestUnstake(providerA, 120 * USDC);
        uint256 unbondsAt = block.timestamp + UNBONDING_PERIOD;
        vm.warp(unbondsAt - 1);
        vm.expectRevert(
            abi.encodeWithSelector(IStakeManager.UnbondingNotFinished.selector, providerA, unbondsAt, unbondsAt - 1)
        );
        vm.prank(providerA);
        stakeManager.withdraw();
    }

    function test_RevertWhen_WithdrawWithNothingUnbonding() public {
        _stake(providerA, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(IStakeManager.NothingToWithdraw.selector, providerA));
        vm.prank(providerA);
        stakeManager.withdraw();
    }

    function test_RevertWhen_WithdrawTwice() public {
        _stake(providerA, MIN_STAKE);
        _requestUnstake(providerA, MIN_STAKE);
        vm.warp(block.timestamp + UNBONDING_PERIOD);
        vm.prank(providerA);
        stakeManager.withdraw();
        vm.expectRevert(abi.encodeWithSelector(IStakeManager.NothingToWithdraw.selector, providerA));
        vm.prank(providerA);
        stakeManager.withdraw();
    }

    // ---------------------------------------------------------------- slash

    function test_slash_SplitsBetweenChallengerAndTreasury() public {
        _stake(providerA, 300 * USDC);
        uint256 challengerShare = 100 * USDC * CHALLENGER_BPS / 10_000;
        vm.expectEmit(address(stakeManager));
        emit IStakeManager.Slashed(providerA, validator, EVIDENCE, 100 * USDC, challengerShare);
        uint256 slashed = _slash(providerA, 100 * USDC, EVIDENCE);

        assertEq(slashed, 100 * USDC, "slashed");
        assertEq(token.balanceOf(validator), challengerShare, "challenger");
        assertEq(token.balanceOf(treasury), 100 * USDC - challengerShare, "treasury");
        assertTrue(stakeManager.evidenceUsed(EVIDENCE), "evidence used");
        _assertStake(providerA, 200 * USDC, 0, 0);
        assertEq(stakeManager.totalStaked(), 200 * USDC, "total staked");
        _assertBacked();
    }

    function test_slash_RoundsChallengerShareDown() public {
        _stake(providerA, MIN_STAKE);
        // 2,500 bps of 3 is 0.75: the challenger gets 0, the treasury 3.
        _slash(providerA, 3, EVIDENCE);
        assertEq(token.balanceOf(validator), 0, "challenger");
        assertEq(token.balanceOf(treasury), 3, "treasury");
    }

    function test_slash_TakesBondedBeforeUnbonding() public {
        _stake(providerA, 300 * USDC);
        _requestUnstake(providerA, 100 * USDC);
        uint256 unbondsAt = block.timestamp + UNBONDING_PERIOD;
        _slash(providerA, 250 * USDC, EVIDENCE);
        _assertStake(providerA, 0, 50 * USDC, unbondsAt);
        assertEq(stakeManager.totalStaked(), 0, "total staked");
        assertEq(stakeManager.totalUnbonding(), 50 * USDC, "total unbonding");
        _assertBacked();
    }

    function test_slash_ReachesStakeWhileUnbonding() public {
        _stake(providerA, 300 * USDC);
        _requestUnstake(providerA, 300 * USDC);
        vm.warp(block.timestamp + UNBONDING_PERIOD - 1);

        uint256 slashed = _slash(providerA, 120 * USDC, EVIDENCE);
        assertEq(slashed, 120 * USDC, "slashed");

        vm.warp(block.timestamp + 1);
        vm.prank(providerA);
        assertEq(stakeManager.withdraw(), 180 * USDC, "withdrawn after slash");
        _assertBacked();
    }

    function test_slash_ReachesStakeAfterPeriodUntilWithdrawn() public {
        _stake(providerA, 300 * USDC);
        _requestUnstake(providerA, 300 * USDC);
        vm.warp(block.timestamp + UNBONDING_PERIOD + 30 days);
        assertEq(_slash(providerA, 300 * USDC, EVIDENCE), 300 * USDC, "slashed");
        vm.expectRevert(abi.encodeWithSelector(IStakeManager.NothingToWithdraw.selector, providerA));
        vm.prank(providerA);
        stakeManager.withdraw();
    }

    function test_slash_CapsAtAvailableStake() public {
        _stake(providerA, 300 * USDC);
        _requestUnstake(providerA, 100 * USDC);
        uint256 challengerShare = 300 * USDC * CHALLENGER_BPS / 10_000;
        vm.expectEmit(address(stakeManager));
        emit IStakeManager.Slashed(providerA, validator, EVIDENCE, 300 * USDC, challengerShare);
        uint256 slashed = _slash(providerA, 1_000 * USDC, EVIDENCE);

        assertEq(slashed, 300 * USDC, "capped");
        assertEq(token.balanceOf(validator) + token.balanceOf(treasury), 300 * USDC, "all taken, no more");
        _assertStake(providerA, 0, 0, block.timestamp + UNBONDING_PERIOD);
        assertEq(token.balanceOf(address(stakeManager)), 0, "emptied");
    }

    function test_slash_LeavesOtherProvidersAlone() public {
        _stake(providerA, 300 * USDC);
        _stake(providerB, 200 * USDC);
        _slash(providerA, 1_000 * USDC, EVIDENCE);
        _assertStake(providerB, 200 * USDC, 0, 0);
        assertEq(stakeManager.totalStaked(), 200 * USDC, "total staked");
        _assertBacked();
    }

    /// @dev A second StakeManager with another challenger share, providerA staked MIN_STAKE in it.
    function _stakeManagerWithBps(uint256 bps) internal returns (StakeManager sm) {
        sm = new StakeManager(token, treasury, admin, MIN_STAKE, UNBONDING_PERIOD, bps);
        bytes32 role = sm.SLASHER_ROLE();
        vm.prank(admin);
        sm.grantRole(role, validator);
        _fund(providerA, address(sm), MIN_STAKE);
        vm.prank(providerA);
        sm.stake(MIN_STAKE);
    }

    function test_slash_AllToChallengerAtFullBasisPoints() public {
        StakeManager sm = _stakeManagerWithBps(10_000);

        vm.prank(validator);
        sm.slash(providerA, 7, EVIDENCE);
        assertEq(token.balanceOf(validator), 7, "challenger");
        assertEq(token.balanceOf(treasury), 0, "treasury");
    }

    function test_slash_AllToTreasuryAtZeroBasisPoints() public {
        StakeManager sm = _stakeManagerWithBps(0);

        vm.prank(validator);
        sm.slash(providerA, 7, EVIDENCE);
        assertEq(token.balanceOf(validator), 0, "challenger");
        assertEq(token.balanceOf(treasury), 7, "treasury");
    }

    function test_RevertWhen_SlashCallerLacksSlasherRole() public {
        _stake(providerA, MIN_STAKE);
        bytes32 role = stakeManager.SLASHER_ROLE();
        vm.expectRevert(abi.encodeWithSelector(IAccessControl.AccessControlUnauthorizedAccount.selector, admin, role));
        vm.prank(admin);
        stakeManager.slash(providerA, 1, EVIDENCE);
    }

    function test_RevertWhen_SlashEvidenceReused() public {
        _stake(providerA, MIN_STAKE);
        _stake(providerB, MIN_STAKE);
        _slash(providerA, 1, EVIDENCE);
        // The same evidence cannot be spent again, not even on another provider.
        vm.expectRevert(abi.encodeWithSelector(IStakeManager.EvidenceAlreadyUsed.selector, EVIDENCE));
        _slash(providerB, 1, EVIDENCE);
    }

    function test_RevertWhen_SlashZero() public {
        _stake(providerA, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(IStakeManager.ZeroAmount.selector));
        _slash(providerA, 0, EVIDENCE);
    }

    function test_RevertWhen_SlashProviderWithoutStake() public {
        vm.expectRevert(abi.encodeWithSelector(IStakeManager.NothingToSlash.selector, providerA));
        _slash(providerA, 1, EVIDENCE);
        assertEq(stakeManager.evidenceUsed(EVIDENCE), false, "evidence still unused");
    }

    function test_slash_RevokedSlasherCannotSlash() public {
        _stake(providerA, MIN_STAKE);
        bytes32 role = stakeManager.SLASHER_ROLE();
        vm.prank(admin);
        stakeManager.revokeRole(role, validator);
        vm.expectRevert(
            abi.encodeWithSelector(IAccessControl.AccessControlUnauthorizedAccount.selector, validator, role)
        );
        _slash(providerA, 1, EVIDENCE);
    }

    function test_RevertWhen_GrantSlasherRoleCallerIsNotAdmin() public {
        bytes32 role = stakeManager.SLASHER_ROLE();
        vm.expectRevert(
            abi.encodeWithSelector(IAccessControl.AccessControlUnauthorizedAccount.selector, validator, bytes32(0))
        );
        vm.prank(validator);
        stakeManager.grantRole(role, stranger);
    }

    function test_renounceRole_SlasherGivesUpRole() public {
        bytes32 role = stakeManager.SLASHER_ROLE();
        vm.expectRevert(abi.encodeWithSelector(IAccessControl.AccessControlBadConfirmation.selector));
        vm.prank(validator);
        stakeManager.renounceRole(role, admin);

        vm.prank(validator);
        stakeManager.renounceRole(role, validator);
        assertEq(stakeManager.hasRole(role, validator), false, "renounced");
    }

    // ---------------------------------------------------------------- isActive and setMinStake

    function test_isActive_RequiresMinimumBondedStake() public {
        assertEq(stakeManager.isActive(providerA), false, "no stake");
        _stake(providerA, MIN_STAKE);
        assertTrue(stakeManager.isActive(providerA), "at minimum");
        _requestUnstake(providerA, 1);
        assertEq(stakeManager.isActive(providerA), false, "unbonding does not count");
    }

    function test_isActive_FalseWithoutStakeEvenAtZeroMinimum() public {
        vm.prank(admin);
        stakeManager.setMinStake(0);
        assertEq(stakeManager.isActive(providerA), false, "zero stake is never active");
    }

    function test_isActive_FalseAfterSlashBelowMinimum() public {
        _stake(providerA, MIN_STAKE);
        _slash(providerA, 1, EVIDENCE);
        assertEq(stakeManager.isActive(providerA), false, "slashed below minimum");
    }

    function test_setMinStake_ChangesActivityThreshold() public {
        _stake(providerA, MIN_STAKE);
        vm.expectEmit(address(stakeManager));
        emit IStakeManager.MinStakeChanged(MIN_STAKE, MIN_STAKE + 1);
        vm.prank(admin);
        stakeManager.setMinStake(MIN_STAKE + 1);

        assertEq(stakeManager.minStake(), MIN_STAKE + 1, "min stake");
        assertEq(stakeManager.isActive(providerA), false, "below the new minimum");

        _fund(providerA, address(stakeManager), 1);
        vm.prank(providerA);
        stakeManager.stake(1);
        assertTrue(stakeManager.isActive(providerA), "topped up");
    }

    function test_RevertWhen_SetMinStakeCallerIsNotAdmin() public {
        vm.expectRevert(
            abi.encodeWithSelector(IAccessControl.AccessControlUnauthorizedAccount.selector, validator, bytes32(0))
        );
        vm.prank(validator);
        stakeManager.setMinStake(1);
    }

    // ---------------------------------------------------------------- fuzz

    function testFuzz_stake_RequestUnstakeWithdraw_RoundTrips(uint256 amount, uint256 unstake, uint256 wait) public {
        amount = bound(amount, MIN_STAKE, type(uint128).max);
        unstake = bound(unstake, 1, amount);
        wait = bound(wait, 0, 3 * UNBONDING_PERIOD);
        _stake(providerA, amount);
        _requestUnstake(providerA, unstake);
        uint256 unbondsAt = block.timestamp + UNBONDING_PERIOD;
        vm.warp(block.timestamp + wait);

        if (wait < UNBONDING_PERIOD) {
            vm.expectRevert(
                abi.encodeWithSelector(
                    IStakeManager.UnbondingNotFinished.selector, providerA, unbondsAt, block.timestamp
                )
            );
            vm.prank(providerA);
            stakeManager.withdraw();
        } else {
            vm.prank(providerA);
            assertEq(stakeManager.withdraw(), unstake, "withdrawn");
            assertEq(token.balanceOf(providerA), unstake, "paid");
        }
        assertEq(stakeManager.totalStaked(), amount - unstake, "total staked");
        assertEq(stakeManager.isActive(providerA), amount - unstake >= MIN_STAKE, "activity");
        _assertBacked();
    }

    function testFuzz_slash_CapsAndSplits(uint256 amount, uint256 unstake, uint256 slashAmount) public {
        amount = bound(amount, MIN_STAKE, type(uint128).max);
        unstake = bound(unstake, 0, amount);
        slashAmount = bound(slashAmount, 1, type(uint256).max);
        _stake(providerA, amount);
        if (unstake != 0) _requestUnstake(providerA, unstake);

        uint256 expected = slashAmount < amount ? slashAmount : amount;
        uint256 slashed = _slash(providerA, slashAmount, EVIDENCE);

        assertEq(slashed, expected, "slashed");
        uint256 challengerShare = expected * CHALLENGER_BPS / 10_000;
        assertEq(token.balanceOf(validator), challengerShare, "challenger");
        assertEq(token.balanceOf(treasury), expected - challengerShare, "treasury");
        IStakeManager.Stake memory s = stakeManager.stakeOf(providerA);
        uint256 bonded = amount - unstake;
        uint256 fromBonded = expected < bonded ? expected : bonded;
        assertEq(s.staked, bonded - fromBonded, "bonded taken first");
        assertEq(s.unbonding, unstake - (expected - fromBonded), "then unbonding");
        _assertBacked();
    }
}
