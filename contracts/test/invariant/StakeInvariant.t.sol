// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {InvariantBase} from "./InvariantBase.sol";
import {IStakeManager} from "../../src/interfaces/IStakeManager.sol";

/// @notice StakeManager accounting under random sequences of stakes, unstakes, withdrawals and slashes.
contract StakeInvariantTest is InvariantBase {
    function setUp() public override {
        super.setUp();
        _deployStaking();
    }

    /// @notice balance == totalStaked + totalUnbonding == the sum over providers of staked + unbonding.
    function invariant_stakeAccounting() public view {
        uint256 staked;
        uint256 unbonding;
        for (uint256 i; i < providers.length; ++i) {
            IStakeManager.Stake memory s = stakeManager.stakeOf(providers[i]);
            staked += s.staked;
            unbonding += s.unbonding;
        }
        assertEq(stakeManager.totalStaked(), staked, "totalStaked == sum of staked");
        assertEq(stakeManager.totalUnbonding(), unbonding, "totalUnbonding == sum of unbonding");
        assertEq(
            token.balanceOf(address(stakeManager)),
            stakeManager.totalStaked() + stakeManager.totalUnbonding(),
            "balance == totalStaked + totalUnbonding"
        );
    }

    /// @notice Every token that came in is still held, was withdrawn, or was slashed to the validator and treasury.
    function invariant_stakeFlowsBalance() public view {
        assertEq(
            token.balanceOf(address(stakeManager)),
            staking.ghost_staked() - staking.ghost_withdrawn() - staking.ghost_slashed(),
            "held == staked - withdrawn - slashed"
        );
        assertEq(token.balanceOf(validator), staking.ghost_challengerPaid(), "challenger shares");
        assertEq(
            token.balanceOf(validator) + token.balanceOf(treasury), staking.ghost_slashed(), "slashes split in full"
        );
    }

    function invariant_contractsMatchHandlerModel() public view {
        assertEq(staking.ghost_mismatches(), 0, "mismatches");
    }
}
