// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {InvariantBase} from "./InvariantBase.sol";

/// @notice Both handlers on one system: no action, in any order, creates or loses a token. Every address that can
/// ever hold one is summed and compared with totalSupply, as solmate's ERC20 invariant does.
contract ConservationInvariantTest is InvariantBase {
    function setUp() public override {
        super.setUp();
        _deployPayments();
        _deployStaking();
    }

    function _actors() internal view returns (address[] memory all) {
        address[] memory payers = payments.payers();
        address[] memory claimers = payments.claimers();
        address[] memory fixed_ = new address[](9);
        (fixed_[0], fixed_[1], fixed_[2], fixed_[3]) = (address(escrow), address(distributor), treasury, validator);
        (fixed_[4], fixed_[5], fixed_[6]) = (address(stakeManager), admin, address(payments));
        (fixed_[7], fixed_[8]) = (address(staking), address(this));

        all = new address[](fixed_.length + payers.length + claimers.length);
        uint256 n;
        for (uint256 i; i < fixed_.length; ++i) {
            all[n++] = fixed_[i];
        }
        for (uint256 i; i < payers.length; ++i) {
            all[n++] = payers[i];
        }
        // Claimers are the providers, the stranger and the operator.
        for (uint256 i; i < claimers.length; ++i) {
            all[n++] = claimers[i];
        }
        for (uint256 i; i < all.length; ++i) {
            for (uint256 j = i + 1; j < all.length; ++j) {
                assertTrue(all[i] != all[j], "actors are distinct");
            }
        }
    }

    function invariant_totalSupplyEqualsSumOfBalances() public view {
        address[] memory all = _actors();
        uint256 sum;
        for (uint256 i; i < all.length; ++i) {
            sum += token.balanceOf(all[i]);
        }
        assertEq(sum, token.totalSupply(), "sum of balances == totalSupply");
    }

    function invariant_stakeAccounting() public view {
        assertEq(
            token.balanceOf(address(stakeManager)),
            stakeManager.totalStaked() + stakeManager.totalUnbonding(),
            "stake balance == staked + unbonding"
        );
    }

    function invariant_distributorSolvent() public view {
        assertGe(
            token.balanceOf(address(distributor)),
            distributor.providerTotal() - distributor.totalClaimed(),
            "open promises are funded"
        );
    }

    function invariant_contractsMatchHandlerModels() public view {
        assertEq(payments.ghost_mismatches(), 0, "payments mismatches");
        assertEq(staking.ghost_mismatches(), 0, "staking mismatches");
    }
}
