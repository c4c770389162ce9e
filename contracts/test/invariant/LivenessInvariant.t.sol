// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {InvariantBase} from "./InvariantBase.sol";
import {LivenessHandler} from "./handlers/LivenessHandler.sol";

/// @notice Settlement never stalls: whatever payers do (fund, get charged, start and finalize exits at any moment),
/// every epoch the operator closes lands, its redemptions and its root, and reverts anywhere fail the run.
contract LivenessInvariantTest is InvariantBase {
    LivenessHandler internal liveness;

    function setUp() public override {
        super.setUp();
        uint256[] memory keys = new uint256[](3);
        (keys[0], keys[1], keys[2]) = (ALICE_PK, BOB_PK, CAROL_PK);
        liveness = new LivenessHandler(token, escrow, distributor, admin, operator, providerA, keys);
        vm.label(address(liveness), "LivenessHandler");
        bytes4[] memory selectors = new bytes4[](7);
        selectors[0] = LivenessHandler.warp.selector;
        selectors[1] = LivenessHandler.fund.selector;
        selectors[2] = LivenessHandler.charge.selector;
        selectors[3] = LivenessHandler.startExit.selector;
        selectors[4] = LivenessHandler.finalizeExit.selector;
        selectors[5] = LivenessHandler.settle.selector;
        selectors[6] = LivenessHandler.claim.selector;
        targetContract(address(liveness));
        targetSelector(FuzzSelector(address(liveness), selectors));
    }

    /// forge-config: default.invariant.fail-on-revert = true
    function invariant_everyEpochSettles() public view {
        assertEq(distributor.epoch(), liveness.ghost_settles(), "every settle posted its epoch");
        assertEq(liveness.ghost_mismatches(), 0, "an open or exiting channel was left with charges uncollected");
    }

    /// forge-config: default.invariant.fail-on-revert = true
    function invariant_onlyEscapedChargesAreLost() public view {
        bytes32[] memory ids = liveness.channels();
        uint256 charged;
        uint256 claimed;
        for (uint256 i; i < ids.length; ++i) {
            charged += liveness.ghost_charged(ids[i]);
            claimed += escrow.channel(ids[i]).claimed;
        }
        // What is neither collected nor escaped is what the next settle will collect.
        assertLe(claimed + liveness.ghost_escaped(), charged, "never more than charged");
        assertEq(escrow.totalRedeemed(), claimed, "redeemed == claimed");
        assertEq(distributor.claimed(providerA), distributor.totalClaimed(), "one provider");
        assertLe(distributor.totalClaimed(), liveness.ghost_posted(), "claims within the posted leaf");
    }
}
