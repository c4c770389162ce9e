// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {InvariantBase} from "./InvariantBase.sol";
import {IVoucherEscrow} from "../../src/interfaces/IVoucherEscrow.sol";

/// @notice Escrow and distributor accounting under random sequences of deposits, batch redemptions, exits, root
/// posts and claims.
contract PaymentsInvariantTest is InvariantBase {
    function setUp() public override {
        super.setUp();
        _deployPayments();
    }

    /// @notice Per channel: claimed <= the largest voucher signed <= everything deposited, and the channel's numbers
    /// are exactly what went in, came out and was refunded.
    function invariant_channelClaimedWithinVoucherAndDeposit() public view {
        bytes32[] memory ids = payments.channels();
        for (uint256 i; i < ids.length; ++i) {
            IVoucherEscrow.Channel memory c = escrow.channel(ids[i]);
            assertLe(c.claimed, payments.ghost_maxVoucher(ids[i]), "claimed <= max voucher");
            assertLe(payments.ghost_maxVoucher(ids[i]), payments.ghost_deposited(ids[i]), "max voucher <= deposited");
            assertLe(c.claimed, c.deposit, "claimed <= deposit");
            assertEq(c.claimed, payments.ghost_redeemed(ids[i]), "claimed == redeemed from channel");
            assertEq(
                c.deposit,
                payments.ghost_deposited(ids[i]) - payments.ghost_refunded(ids[i]),
                "deposit == deposited - refunded"
            );
        }
    }

    /// @notice The escrow holds exactly the unclaimed part of every channel.
    function invariant_escrowHoldsUnclaimedDeposits() public view {
        bytes32[] memory ids = payments.channels();
        uint256 unclaimed;
        for (uint256 i; i < ids.length; ++i) {
            IVoucherEscrow.Channel memory c = escrow.channel(ids[i]);
            unclaimed += c.deposit - c.claimed;
        }
        assertEq(token.balanceOf(address(escrow)), unclaimed, "escrow balance == sum of unclaimed");
        assertEq(
            unclaimed,
            payments.ghost_totalDeposited() - payments.ghost_totalRedeemed() - payments.ghost_totalRefunded(),
            "unclaimed == deposited - redeemed - refunded"
        );
        assertEq(escrow.totalRedeemed(), payments.ghost_totalRedeemed(), "totalRedeemed");
    }

    /// @notice No provider claims more than its posted cumulative amount, nor all together more than the total.
    function invariant_claimsWithinPostedTotals() public view {
        uint256 sum;
        for (uint256 i; i < providers.length; ++i) {
            uint256 claimed = distributor.claimed(providers[i]);
            assertLe(claimed, payments.ghost_posted(providers[i]), "claimed <= posted cumulative");
            sum += claimed;
        }
        assertEq(distributor.totalClaimed(), sum, "totalClaimed == sum of claims");
        assertEq(sum, payments.ghost_totalClaimed(), "claims seen by the handler");
        assertLe(distributor.totalClaimed(), distributor.providerTotal(), "totalClaimed <= providerTotal");
    }

    /// @notice The distributor holds what was redeemed less fees and claims, which covers every open promise; fees
    /// are 20% rounded up of what was redeemed when the last root was posted.
    function invariant_distributorBacksPromises() public view {
        uint256 balance = token.balanceOf(address(distributor));
        uint256 redeemed = escrow.totalRedeemed();
        assertEq(balance, redeemed - distributor.feesPaid() - distributor.totalClaimed(), "distributor balance");
        assertGe(balance, distributor.providerTotal() - distributor.totalClaimed(), "open promises are funded");
        assertLe(distributor.providerTotal(), distributor.providerPool(redeemed), "providerTotal <= pool");
        uint256 posted = payments.ghost_lastPostedRedeemed();
        assertEq(distributor.feesPaid(), posted - distributor.providerPool(posted), "fees == posted - pool");
        assertEq(token.balanceOf(treasury), distributor.feesPaid(), "treasury received the fees");
    }

    function invariant_contractsMatchHandlerModel() public view {
        assertEq(payments.ghost_mismatches(), 0, "mismatches");
    }
}
