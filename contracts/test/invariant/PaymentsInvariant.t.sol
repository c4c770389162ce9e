// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {InvariantBase} from "./InvariantBase.sol";
import {IVoucherEscrow} from "../../src/interfaces/IVoucherEscrow.sol";

/// @notice Escrow and distributor accounting under random sequences of deposits, batch redemptions, exits, attempts to
/// reuse closed channels, direct transfers to the distributor, root posts and claims.
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

    /// @notice A closed channel stays closed and holds exactly what was claimed from it, so no voucher signed for it
    /// can take anything more; the handler's attempts to reuse one all failed (counted in the mismatches).
    function invariant_closedChannelsStayClosed() public view {
        bytes32[] memory closed = payments.closedChannels();
        for (uint256 i; i < closed.length; ++i) {
            assertTrue(payments.ghost_closed(closed[i]), "closed in the model");
            assertEq(escrow.withdrawableAt(closed[i]), escrow.CLOSED(), "withdrawableAt == CLOSED");
            IVoucherEscrow.Channel memory c = escrow.channel(closed[i]);
            assertEq(c.deposit, c.claimed, "closed channel: deposit == claimed");
        }
        bytes32[] memory ids = payments.channels();
        uint256 closedSeen;
        for (uint256 i; i < ids.length; ++i) {
            if (payments.ghost_closed(ids[i])) {
                ++closedSeen;
            } else {
                assertTrue(
                    escrow.withdrawableAt(ids[i]) != escrow.CLOSED(), "only channels the model closed are closed"
                );
            }
        }
        assertEq(closedSeen, closed.length, "every closed channel is tracked");
    }

    /// @notice The distributor's funding is what was redeemed plus what was sent to it directly; it holds that less
    /// fees and claims, which covers every open promise. Fees are 20% rounded up of the funding at the last post.
    function invariant_distributorBacksPromises() public view {
        uint256 balance = token.balanceOf(address(distributor));
        uint256 funded = distributor.funded();
        assertEq(
            funded, payments.ghost_totalRedeemed() + payments.ghost_totalTransferredIn(), "funded == redeemed + sent"
        );
        assertEq(balance, funded - distributor.feesPaid() - distributor.totalClaimed(), "distributor balance");
        assertGe(balance, distributor.providerTotal() - distributor.totalClaimed(), "open promises are funded");
        uint256 posted = payments.ghost_lastPostedFunded();
        assertLe(posted, funded, "funding never shrinks");
        assertLe(distributor.providerTotal(), distributor.providerPool(posted), "providerTotal <= pool when posted");
        assertEq(distributor.feesPaid(), posted - distributor.providerPool(posted), "fees == posted - pool");
        assertEq(token.balanceOf(treasury), distributor.feesPaid(), "treasury received the fees");
    }

    function invariant_contractsMatchHandlerModel() public view {
        assertEq(payments.ghost_mismatches(), 0, "mismatches");
    }
}
