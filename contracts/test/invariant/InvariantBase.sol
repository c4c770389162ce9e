// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Base} from "../Base.t.sol";
import {InvariantTest} from "../utils/Test.sol";
import {PaymentsHandler} from "./handlers/PaymentsHandler.sol";
import {StakeHandler} from "./handlers/StakeHandler.sol";

/// @notice The deployed system from Base plus the handlers, with forge pointed at the handlers' actions only.
abstract contract InvariantBase is Base, InvariantTest {
    uint256 internal constant CAROL_PK = 0xCA201;

    PaymentsHandler internal payments;
    StakeHandler internal staking;
    address[] internal providers;

    function setUp() public virtual override {
        super.setUp();
        providers.push(providerA);
        providers.push(providerB);
        providers.push(providerC);
        providers.push(makeAddr("providerD"));
        providers.push(makeAddr("providerE"));
    }

    function _deployPayments() internal {
        uint256[] memory keys = new uint256[](3);
        (keys[0], keys[1], keys[2]) = (ALICE_PK, BOB_PK, CAROL_PK);
        vm.label(vm.addr(CAROL_PK), "carol");
        address[] memory claimers = new address[](providers.length + 2);
        for (uint256 i; i < providers.length; ++i) {
            claimers[i] = providers[i];
        }
        claimers[providers.length] = stranger;
        claimers[providers.length + 1] = operator;

        payments = new PaymentsHandler(token, escrow, distributor, admin, operator, keys, providers, claimers);
        vm.label(address(payments), "PaymentsHandler");

        bytes4[] memory selectors = new bytes4[](11);
        selectors[0] = PaymentsHandler.warp.selector;
        selectors[1] = PaymentsHandler.deposit.selector;
        selectors[2] = PaymentsHandler.redeem.selector;
        selectors[3] = PaymentsHandler.redeemInvalid.selector;
        selectors[4] = PaymentsHandler.initiateWithdraw.selector;
        selectors[5] = PaymentsHandler.finalizeWithdraw.selector;
        selectors[6] = PaymentsHandler.useClosedChannel.selector;
        selectors[7] = PaymentsHandler.transferToDistributor.selector;
        selectors[8] = PaymentsHandler.postRoot.selector;
        selectors[9] = PaymentsHandler.claim.selector;
        selectors[10] = PaymentsHandler.claimInvalid.selector;
        targetContract(address(payments));
        targetSelector(FuzzSelector(address(payments), selectors));
    }

    function _deployStaking() internal {
        staking = new StakeHandler(token, stakeManager, admin, admin, validator, providers);
        vm.label(address(staking), "StakeHandler");

        bytes4[] memory selectors = new bytes4[](6);
        selectors[0] = StakeHandler.warp.selector;
        selectors[1] = StakeHandler.stake.selector;
        selectors[2] = StakeHandler.requestUnstake.selector;
        selectors[3] = StakeHandler.withdraw.selector;
        selectors[4] = StakeHandler.slash.selector;
        selectors[5] = StakeHandler.setMinStake.selector;
        targetContract(address(staking));
        targetSelector(FuzzSelector(address(staking), selectors));
    }
}
