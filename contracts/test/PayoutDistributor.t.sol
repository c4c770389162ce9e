// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Base} from "./Base.t.sol";
import {Merkle} from "./utils/Merkle.sol";
import {PayoutDistributor} from "../src/PayoutDistributor.sol";
import {IPayoutDistributor} from "../src/interfaces/IPayoutDistributor.sol";
import {IVoucherEscrow} from "../src/interfaces/IVoucherEscrow.sol";
import {IAccessControl} from "@openzeppelin/contracts/access/IAccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

contract PayoutDistributorTest is Base {
    // Stand-in roots for tests about totals and fees, where no one claims.
    bytes32 internal constant ROOT_0 = keccak256("root 0");
    bytes32 internal constant ROOT_1 = keccak256("root 1");
    bytes32 internal constant ROOT_2 = keccak256("root 2");
    bytes32 internal constant ROOT_3 = keccak256("root 3");

    /// @dev One posted tree: its providers, their cumulative amounts and leaf hashes, and its root.
    struct Tree {
        address[] providers;
        uint256[] amounts;
        bytes32[] leaves;
        bytes32 root;
    }

    function _tree(address[] memory providers, uint256[] memory amounts) internal pure returns (Tree memory t) {
        t.providers = providers;
        t.amounts = amounts;
        t.leaves = Merkle.leaves(providers, amounts);
        t.root = Merkle.root(t.leaves);
    }

    function _tree3(uint256 a, uint256 b, uint256 c) internal view returns (Tree memory) {
        address[] memory providers = new address[](3);
        (providers[0], providers[1], providers[2]) = (providerA, providerB, providerC);
        uint256[] memory amounts = new uint256[](3);
        (amounts[0], amounts[1], amounts[2]) = (a, b, c);
        return _tree(providers, amounts);
    }

    function _sum(uint256[] memory xs) internal pure returns (uint256 total) {
        for (uint256 i; i < xs.length; ++i) {
            total += xs[i];
        }
    }

    /// @dev Posts `t` as the next epoch with its leaves' sum as providerTotal.
    function _post(Tree memory t) internal {
        _postTotal(t.root, _sum(t.amounts));
    }

    function _postTotal(bytes32 root, uint256 total) internal {
        uint256 next = distributor.epoch() + 1;
        vm.prank(operator);
        distributor.postRoot(next, root, total);
    }

    /// @dev Funds the distributor the other way: a plain token transfer to it, no escrow involved.
    function _transferIn(uint256 amount) internal {
        _mint(stranger, amount);
        vm.prank(stranger);
        assertTrue(token.transfer(address(distributor), amount), "transfer in");
    }

    function _claim(Tree memory t, uint256 i) internal returns (uint256) {
        return distributor.claim(t.providers[i], t.amounts[i], Merkle.proof(t.leaves, i), t.root);
    }

    // ---------------------------------------------------------------- Merkle helper

    function test_merkleHelper_ProofsVerifyForEveryTreeSize() public pure {
        for (uint256 n = 1; n <= 9; ++n) {
            address[] memory providers = new address[](n);
            uint256[] memory amounts = new uint256[](n);
            for (uint256 i; i < n; ++i) {
                // forge-lint: disable-next-line(unsafe-typecast) -- small distinct addresses
                providers[i] = address(uint160(0x1000 + i));
                amounts[i] = 1_000 + i;
            }
            bytes32[] memory leaves = Merkle.leaves(providers, amounts);
            bytes32 root = Merkle.root(leaves);
            for (uint256 i; i < n; ++i) {
                bytes32 node = leaves[i];
                bytes32[] memory proof = Merkle.proof(leaves, i);
                for (uint256 k; k < proof.length; ++k) {
                    node = Merkle.hashPair(node, proof[k]);
                }
                assertEq(node, root, "proof folds to root");
            }
        }
    }

    /// @dev Roots the operator's off-chain tree (settlement/merkle.py, laid out like @openzeppelin/merkle-tree) gives
    /// for accounts 0x..01, 0x..02, ... earning 1,000, 2,000, ...: the helper must build the very same trees.
    function test_merkleHelper_MatchesOffChainTree() public pure {
        bytes32[4] memory roots = [
            bytes32(0xe2ad525aaaf1fb7709959cc06e210437a97f34a5833e3a5c90d2099c5373116a),
            0xb6f554dd8a16c807d679d82ab33501fe6fbd44ceaaaad4c0197fdb57e4665134,
            0x1b62b1f1814283ae8922b5bb77e9c3889b895e411e5363efa6e5240fc4c4f9c3,
            0x5f0411bccd0ad0f189beb8d82be517eb0c6bdb002d97feef2a2a3d9d3a4ba32e
        ];
        uint256[4] memory sizes = [uint256(1), 2, 3, 7];
        bytes32[] memory leaves;
        for (uint256 k; k < 4; ++k) {
            address[] memory accounts = new address[](sizes[k]);
            uint256[] memory amounts = new uint256[](sizes[k]);
            for (uint256 i; i < sizes[k]; ++i) {
                // forge-lint: disable-next-line(unsafe-typecast) -- small distinct addresses
                accounts[i] = address(uint160(i + 1));
                amounts[i] = 1_000 * (i + 1);
            }
            leaves = Merkle.leaves(accounts, amounts);
            assertEq(Merkle.root(leaves), roots[k], "root");
        }
        bytes32[] memory proof = Merkle.proof(leaves, 0);
        assertEq(proof.length, 3, "proof length");
        assertEq(proof[0], 0xac27a3108b6a140bfffa5070fd47423db649df2874201f7422fe07e65b22365e, "proof[0]");
        assertEq(proof[1], 0x607af583a19329aee976fc81a11c14541b54d83b5935a13821c6a472d2de298b, "proof[1]");
        assertEq(proof[2], 0x077306a5ccdd3e488b383cb17ad2fd11a4393dd165485c71261241b0f8fbc730, "proof[2]");
    }

    // ---------------------------------------------------------------- constructor

    function test_constructor_StoresParameters() public view {
        assertEq(address(distributor.token()), address(token), "token");
        assertEq(distributor.treasury(), treasury, "treasury");
        assertEq(distributor.epoch(), 0, "epoch");
        assertEq(distributor.merkleRoot(), bytes32(0), "root");
        assertEq(distributor.providerTotal(), 0, "provider total");
        assertEq(distributor.feesPaid(), 0, "fees paid");
        assertEq(distributor.totalClaimed(), 0, "total claimed");
        assertEq(distributor.funded(), 0, "funded");
        assertTrue(distributor.hasRole(distributor.DEFAULT_ADMIN_ROLE(), admin), "admin");
        assertTrue(distributor.hasRole(distributor.OPERATOR_ROLE(), operator), "operator");
    }

    function test_RevertWhen_ConstructorGivenZeroToken() public {
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.ZeroAddress.selector));
        new PayoutDistributor(IERC20(address(0)), treasury, admin);
    }

    function test_RevertWhen_ConstructorGivenZeroTreasury() public {
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.ZeroAddress.selector));
        new PayoutDistributor(token, address(0), admin);
    }

    function test_RevertWhen_ConstructorGivenZeroAdmin() public {
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.ZeroAddress.selector));
        new PayoutDistributor(token, treasury, address(0));
    }

    // ---------------------------------------------------------------- funded

    function test_funded_CountsRedemptions() public {
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        assertEq(distributor.funded(), 1_000 * USDC, "funded");
        assertEq(distributor.funded(), escrow.totalRedeemed(), "the escrow is the only source here");
    }

    function test_funded_CountsDirectTransfer() public {
        _transferIn(250 * USDC);
        assertEq(distributor.funded(), 250 * USDC, "transfer alone");
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        assertEq(distributor.funded(), 1_250 * USDC, "transfer plus redemption");
    }

    function test_funded_UnchangedByFeesAndClaims() public {
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        Tree memory t = _tree3(300 * USDC, 200 * USDC, 100 * USDC);
        _post(t);
        // 200 went to the treasury and stays counted.
        assertEq(token.balanceOf(address(distributor)), 800 * USDC, "balance after fee");
        assertEq(distributor.funded(), 1_000 * USDC, "after the fee");
        _claim(t, 0);
        _claim(t, 1);
        // 500 went to providers and stays counted.
        assertEq(token.balanceOf(address(distributor)), 300 * USDC, "balance after claims");
        assertEq(distributor.funded(), 1_000 * USDC, "after claims");
    }

    // ---------------------------------------------------------------- postRoot

    function test_postRoot_StoresRootAndPaysFee() public {
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        Tree memory t = _tree3(300 * USDC, 200 * USDC, 100 * USDC);

        vm.expectEmit(address(token));
        emit IERC20.Transfer(address(distributor), treasury, 200 * USDC);
        vm.expectEmit(address(distributor));
        emit IPayoutDistributor.RootPosted(1, t.root, 600 * USDC, 1_000 * USDC, 200 * USDC);
        _post(t);

        assertEq(distributor.epoch(), 1, "epoch");
        assertEq(distributor.merkleRoot(), t.root, "root");
        assertEq(distributor.providerTotal(), 600 * USDC, "provider total");
        assertEq(distributor.feesPaid(), 200 * USDC, "fees paid");
        assertEq(token.balanceOf(treasury), 200 * USDC, "treasury");
        assertEq(token.balanceOf(address(distributor)), 800 * USDC, "pool stays");
    }

    function test_postRoot_FeeRoundsUp() public {
        // 80% of 1,001 is 800.8: providers may be promised 800, the platform takes 201.
        _fundDistributor(1, 1_001, 1_001);
        _postTotal(ROOT_1, 800);
        assertEq(token.balanceOf(treasury), 201, "fee rounded up");
        assertEq(distributor.feesPaid(), 201, "fees paid");
    }

    function test_postRoot_PaysFeeIncrementallyAcrossEpochs() public {
        bytes32 channelId = _fundDistributor(1, 10_000, 1_001);
        _postTotal(ROOT_1, 800);
        assertEq(token.balanceOf(treasury), 201, "epoch 1");

        _redeem(_one(_redemption(ALICE_PK, channelId, 2_000, 2_000)));
        // Cumulative fee is 2,000 - 1,600 = 400, of which 201 is already paid.
        vm.expectEmit(address(distributor));
        emit IPayoutDistributor.RootPosted(2, ROOT_2, 1_600, 2_000, 199);
        _postTotal(ROOT_2, 1_600);
        assertEq(token.balanceOf(treasury), 400, "epoch 2");

        // No new redemptions: no fee, no transfer.
        vm.expectEmit(address(distributor));
        emit IPayoutDistributor.RootPosted(3, ROOT_3, 1_600, 2_000, 0);
        _postTotal(ROOT_3, 1_600);
        assertEq(token.balanceOf(treasury), 400, "epoch 3");
        assertEq(distributor.feesPaid(), 400, "fees paid");
        assertEq(token.balanceOf(address(distributor)), 1_600, "pool");
    }

    function test_postRoot_AcceptsTotalAtExactlyThePool() public {
        _fundDistributor(1, 1_000, 1_000);
        _postTotal(ROOT_1, 800);
        assertEq(distributor.providerTotal(), 800, "provider total");
    }

    function test_postRoot_AcceptsUnchangedProviderTotal() public {
        _fundDistributor(1, 1_000, 1_000);
        _postTotal(ROOT_1, 500);
        _postTotal(ROOT_2, 500);
        assertEq(distributor.epoch(), 2, "epoch");
        assertEq(distributor.merkleRoot(), ROOT_2, "root replaced");
    }

    function test_postRoot_WithNothingFundedPaysNoFee() public {
        vm.expectEmit(address(distributor));
        emit IPayoutDistributor.RootPosted(1, ROOT_1, 0, 0, 0);
        _postTotal(ROOT_1, 0);
        assertEq(distributor.epoch(), 1, "epoch");
        assertEq(distributor.feesPaid(), 0, "fees paid");
        assertEq(token.balanceOf(treasury), 0, "treasury");
    }

    function test_postRoot_CountsRedemptionsUpToThePost() public {
        bytes32 channelId = _fundDistributor(1, 10_000, 1_000);
        // A redemption lands after the operator computed its tree: the post counts it, and a tree computed against
        // less funding is still within the larger pool.
        _redeem(_one(_redemption(ALICE_PK, channelId, 1_500, 1_500)));
        vm.expectEmit(address(distributor));
        emit IPayoutDistributor.RootPosted(1, ROOT_1, 800, 1_500, 300);
        _postTotal(ROOT_1, 800);
        assertEq(token.balanceOf(treasury), 300, "fee on everything funded");
        assertEq(token.balanceOf(address(distributor)), 1_200, "pool");
    }

    function test_postRoot_DirectTransferRaisesPoolAndPaysItsFee() public {
        _fundDistributor(1, 10_000, 1_000);
        _postTotal(ROOT_1, 800);
        assertEq(token.balanceOf(treasury), 200, "epoch 1 fee");

        // 500 arrives by plain transfer, not through the escrow.
        _transferIn(500);
        assertEq(distributor.funded(), 1_500, "funded");
        assertEq(distributor.providerPool(distributor.funded()), 1_200, "pool grew by 80% of it");
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.ProviderTotalExceedsPool.selector, 1_201, 1_200));
        vm.prank(operator);
        distributor.postRoot(2, ROOT_2, 1_201);

        // The next post pays 20% of the transfer to the treasury and may promise the rest.
        vm.expectEmit(address(token));
        emit IERC20.Transfer(address(distributor), treasury, 100);
        vm.expectEmit(address(distributor));
        emit IPayoutDistributor.RootPosted(2, ROOT_2, 1_200, 1_500, 100);
        _postTotal(ROOT_2, 1_200);
        assertEq(token.balanceOf(treasury), 300, "treasury");
        assertEq(distributor.feesPaid(), 300, "fees paid");
        assertEq(token.balanceOf(address(distributor)), 1_200, "pool stays");
        assertEq(escrow.totalRedeemed(), 1_000, "the escrow saw none of it");
    }

    function test_postRoot_FundedByDirectTransferAlone() public {
        _transferIn(1_000 * USDC);
        Tree memory t = _tree3(500 * USDC, 200 * USDC, 100 * USDC);
        vm.expectEmit(address(distributor));
        emit IPayoutDistributor.RootPosted(1, t.root, 800 * USDC, 1_000 * USDC, 200 * USDC);
        _post(t);
        assertEq(token.balanceOf(treasury), 200 * USDC, "fee");
        for (uint256 i; i < 3; ++i) {
            assertEq(_claim(t, i), t.amounts[i], "claimed");
        }
        assertEq(token.balanceOf(address(distributor)), 0, "distributor empty");
    }

    function test_postRoot_AcceptsTotalsUpToUint96() public {
        // 2**98 funds a pool of 3.2 * 2**96 and fees of 0.8 * 2**96: the largest providerTotal storage holds fits.
        uint256 funded = 2 ** 98;
        _transferIn(funded);
        uint256 fees = funded - funded * 8_000 / 10_000;
        _postTotal(ROOT_1, type(uint96).max);
        assertEq(distributor.providerTotal(), type(uint96).max, "provider total");
        assertEq(distributor.feesPaid(), fees, "fees paid");
        assertEq(token.balanceOf(treasury), fees, "treasury");
    }

    function test_RevertWhen_PostRootCallerIsNotOperator() public {
        bytes32 role = distributor.OPERATOR_ROLE();
        vm.expectRevert(abi.encodeWithSelector(IAccessControl.AccessControlUnauthorizedAccount.selector, admin, role));
        vm.prank(admin);
        distributor.postRoot(1, ROOT_1, 0);
    }

    function test_RevertWhen_PostRootSkipsEpoch() public {
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.EpochOutOfOrder.selector, 1, 2));
        vm.prank(operator);
        distributor.postRoot(2, ROOT_2, 0);
    }

    function test_RevertWhen_PostRootGivenEpochZero() public {
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.EpochOutOfOrder.selector, 1, 0));
        vm.prank(operator);
        distributor.postRoot(0, ROOT_0, 0);
    }

    function test_RevertWhen_PostRootRetried() public {
        _fundDistributor(1, 1_000, 1_000);
        vm.prank(operator);
        distributor.postRoot(1, ROOT_1, 800);
        // The same post again must not land twice.
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.EpochOutOfOrder.selector, 2, 1));
        vm.prank(operator);
        distributor.postRoot(1, ROOT_1, 800);
    }

    function test_RevertWhen_PostRootProviderTotalDecreases() public {
        _fundDistributor(1, 1_000, 1_000);
        _postTotal(ROOT_1, 700);
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.ProviderTotalDecreased.selector, 700, 699));
        vm.prank(operator);
        distributor.postRoot(2, ROOT_2, 699);
    }

    function test_RevertWhen_PostRootProviderTotalExceedsPool() public {
        _fundDistributor(1, 1_001, 1_001);
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.ProviderTotalExceedsPool.selector, 801, 800));
        vm.prank(operator);
        distributor.postRoot(1, ROOT_1, 801);
    }

    function test_RevertWhen_PostRootWithNothingFundedPromisesAnything() public {
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.ProviderTotalExceedsPool.selector, 1, 0));
        vm.prank(operator);
        distributor.postRoot(1, ROOT_1, 1);
    }

    function test_RevertWhen_PostRootProviderTotalOverflowsUint96() public {
        // The pool (3.2 * 2**96) allows it and the fee (0.8 * 2**96) fits: only providerTotal is too large to store.
        _transferIn(2 ** 98);
        uint256 tooLarge = uint256(type(uint96).max) + 1;
        vm.expectRevert(abi.encodeWithSelector(SafeCast.SafeCastOverflowedUintDowncast.selector, 96, tooLarge));
        vm.prank(operator);
        distributor.postRoot(1, ROOT_1, tooLarge);
    }

    function test_RevertWhen_PostRootFeesOverflowUint96() public {
        // 20% of 2**99 is 1.6 * 2**96: the cumulative fee no longer fits in its 96 bits.
        uint256 funded = 2 ** 99;
        _transferIn(funded);
        uint256 fees = funded - funded * 8_000 / 10_000;
        vm.expectRevert(abi.encodeWithSelector(SafeCast.SafeCastOverflowedUintDowncast.selector, 96, fees));
        vm.prank(operator);
        distributor.postRoot(1, ROOT_1, 0);
        assertEq(token.balanceOf(treasury), 0, "nothing paid");
    }

    // ---------------------------------------------------------------- claim

    function test_claim_PaysProvider() public {
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        Tree memory t = _tree3(300 * USDC, 200 * USDC, 100 * USDC);
        _post(t);

        vm.expectEmit(address(token));
        emit IERC20.Transfer(address(distributor), providerA, 300 * USDC);
        vm.expectEmit(address(distributor));
        emit IPayoutDistributor.Claimed(providerA, providerA, 300 * USDC, 300 * USDC);
        vm.prank(providerA);
        uint256 amount = _claim(t, 0);

        assertEq(amount, 300 * USDC, "returned");
        assertEq(token.balanceOf(providerA), 300 * USDC, "provider paid");
        assertEq(distributor.claimed(providerA), 300 * USDC, "claimed");
        assertEq(distributor.totalClaimed(), 300 * USDC, "total claimed");
        assertEq(token.balanceOf(address(distributor)), 500 * USDC, "rest of the pool");
    }

    function test_claim_EveryLeafOfTheTree() public {
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        Tree memory t = _tree3(300 * USDC, 200 * USDC, 100 * USDC);
        _post(t);
        for (uint256 i; i < 3; ++i) {
            _claim(t, i);
            assertEq(token.balanceOf(t.providers[i]), t.amounts[i], "paid");
        }
        assertEq(distributor.totalClaimed(), distributor.providerTotal(), "everything claimed");
        assertEq(token.balanceOf(address(distributor)), 200 * USDC, "unpromised pool remains");
    }

    function test_claim_ByThirdPartyPaysProvider() public {
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        Tree memory t = _tree3(300 * USDC, 200 * USDC, 100 * USDC);
        _post(t);

        vm.expectEmit(address(distributor));
        emit IPayoutDistributor.Claimed(providerB, stranger, 200 * USDC, 200 * USDC);
        vm.prank(stranger);
        _claim(t, 1);
        assertEq(token.balanceOf(providerB), 200 * USDC, "provider paid");
        assertEq(token.balanceOf(stranger), 0, "caller gets nothing");
    }

    function test_claim_PaysOnlyIncreaseAcrossEpochs() public {
        bytes32 channelId = _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        Tree memory one = _tree3(300 * USDC, 200 * USDC, 100 * USDC);
        _post(one);
        _claim(one, 0);

        _redeem(_one(_redemption(ALICE_PK, channelId, 1_500 * USDC, 1_500 * USDC)));
        Tree memory two = _tree3(500 * USDC, 300 * USDC, 100 * USDC);
        _post(two);

        vm.expectEmit(address(distributor));
        emit IPayoutDistributor.Claimed(providerA, address(this), 200 * USDC, 500 * USDC);
        assertEq(_claim(two, 0), 200 * USDC, "increase");
        // B never claimed epoch one: it gets its whole cumulative amount now.
        assertEq(_claim(two, 1), 300 * USDC, "all of B");
        assertEq(token.balanceOf(providerA), 500 * USDC, "A in total");
    }

    function test_claim_SingleLeafTreeNeedsNoProof() public {
        _fundDistributor(1, 1_000, 1_000);
        address[] memory providers = new address[](1);
        providers[0] = providerA;
        uint256[] memory amounts = new uint256[](1);
        amounts[0] = 800;
        Tree memory t = _tree(providers, amounts);
        _post(t);
        assertEq(Merkle.proof(t.leaves, 0).length, 0, "empty proof");
        assertEq(_claim(t, 0), 800, "paid");
    }

    function test_RevertWhen_ClaimWithProofOfAnotherLeaf() public {
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        Tree memory t = _tree3(300 * USDC, 200 * USDC, 100 * USDC);
        _post(t);
        bytes32[] memory wrong = Merkle.proof(t.leaves, 1);
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.InvalidProof.selector, providerA, 300 * USDC));
        distributor.claim(providerA, 300 * USDC, wrong, t.root);
    }

    function test_RevertWhen_ClaimAmountAltered() public {
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        Tree memory t = _tree3(300 * USDC, 200 * USDC, 100 * USDC);
        _post(t);
        bytes32[] memory proof = Merkle.proof(t.leaves, 0);
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.InvalidProof.selector, providerA, 300 * USDC + 1));
        distributor.claim(providerA, 300 * USDC + 1, proof, t.root);
    }

    function test_RevertWhen_ClaimForProviderNotInTree() public {
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        Tree memory t = _tree3(300 * USDC, 200 * USDC, 100 * USDC);
        _post(t);
        bytes32[] memory proof = Merkle.proof(t.leaves, 0);
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.InvalidProof.selector, stranger, 300 * USDC));
        distributor.claim(stranger, 300 * USDC, proof, t.root);
    }

    function test_RevertWhen_ClaimBeforeAnyRoot() public {
        bytes32[] memory proof = new bytes32[](0);
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.InvalidProof.selector, providerA, 1));
        distributor.claim(providerA, 1, proof, bytes32(0));
    }

    /// @dev Two posts: leaves (300, 200, 100) then (500, 300, 100), with the second funded by a further redemption.
    function _twoRoots() internal returns (Tree memory one, Tree memory two) {
        bytes32 channelId = _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        one = _tree3(300 * USDC, 200 * USDC, 100 * USDC);
        _post(one);
        _redeem(_one(_redemption(ALICE_PK, channelId, 1_500 * USDC, 1_500 * USDC)));
        two = _tree3(500 * USDC, 300 * USDC, 100 * USDC);
        _post(two);
    }

    /// @dev A claim proven against the root that a post replaced while the claim was in flight still pays, what
    /// that older leaf says; the newer leaf then pays the rest.
    function test_claim_AgainstThePreviousRootWithinItsGrace() public {
        (Tree memory one, Tree memory two) = _twoRoots();
        assertEq(distributor.previousRoot(), one.root, "previous root");
        assertEq(distributor.previousRootValidUntil(), block.timestamp + distributor.PREVIOUS_ROOT_GRACE(), "grace");
        vm.warp(block.timestamp + distributor.PREVIOUS_ROOT_GRACE() - 1);

        assertEq(distributor.claim(providerA, 300 * USDC, Merkle.proof(one.leaves, 0), one.root), 300 * USDC, "old");
        assertEq(_claim(two, 0), 200 * USDC, "the rest, from the new root");
        assertEq(token.balanceOf(providerA), 500 * USDC, "paid once in all");
    }

    function test_RevertWhen_ClaimAgainstThePreviousRootAfterItsGrace() public {
        (Tree memory one, Tree memory two) = _twoRoots();
        vm.warp(block.timestamp + distributor.PREVIOUS_ROOT_GRACE());
        bytes32[] memory proof = Merkle.proof(one.leaves, 0);
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.StaleRoot.selector, one.root, two.root));
        distributor.claim(providerA, 300 * USDC, proof, one.root);
    }

    function test_RevertWhen_ClaimAgainstARootTwoPostsOld() public {
        (Tree memory one,) = _twoRoots();
        _transferIn(1_000 * USDC);
        Tree memory three = _tree3(600 * USDC, 400 * USDC, 200 * USDC);
        _post(three);
        bytes32[] memory proof = Merkle.proof(one.leaves, 0);
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.StaleRoot.selector, one.root, three.root));
        distributor.claim(providerA, 300 * USDC, proof, one.root);
    }

    function test_RevertWhen_ClaimNamesTheZeroRootAfterTheFirstPost() public {
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        Tree memory t = _tree3(300 * USDC, 200 * USDC, 100 * USDC);
        _post(t);
        bytes32[] memory proof = Merkle.proof(t.leaves, 0);
        vm.expectRevert(abi.encodeWithSelector(IPayoutDistributor.StaleRoot.selector, bytes32(0), t.root));
        distributor.claim(providerA, 300 * USDC, proof, bytes32(0));
    }

    function test_RevertWhen_ClaimTwice() public {
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        Tree memory t = _tree3(300 * USDC, 200 * USDC, 100 * USDC);
        _post(t);
        _claim(t, 0);
        bytes32[] memory proof = Merkle.proof(t.leaves, 0);
        vm.expectRevert(
            abi.encodeWithSelector(IPayoutDistributor.NothingToClaim.selector, providerA, 300 * USDC, 300 * USDC)
        );
        distributor.claim(providerA, 300 * USDC, proof, t.root);
    }

    function test_RevertWhen_ClaimLeafBelowWhatWasClaimed() public {
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        Tree memory one = _tree3(300 * USDC, 200 * USDC, 100 * USDC);
        _post(one);
        _claim(one, 0);
        // A faulty later tree gives A less than it already took: nothing is paid, nothing is clawed back.
        Tree memory two = _tree3(250 * USDC, 200 * USDC, 100 * USDC);
        _postTotal(two.root, 600 * USDC);
        bytes32[] memory proof = Merkle.proof(two.leaves, 0);
        vm.expectRevert(
            abi.encodeWithSelector(IPayoutDistributor.NothingToClaim.selector, providerA, 250 * USDC, 300 * USDC)
        );
        distributor.claim(providerA, 250 * USDC, proof, two.root);
    }

    function test_RevertWhen_ClaimExceedsProviderTotal() public {
        _fundDistributor(1, 2_000 * USDC, 1_000 * USDC);
        // A faulty tree whose leaves add up to 1,200 is posted with a total of 800.
        Tree memory t = _tree3(600 * USDC, 600 * USDC, 0);
        _postTotal(t.root, 800 * USDC);
        _claim(t, 0);

        bytes32[] memory proof = Merkle.proof(t.leaves, 1);
        vm.expectRevert(
            abi.encodeWithSelector(
                IPayoutDistributor.ClaimExceedsProviderTotal.selector, providerB, 600 * USDC, 200 * USDC
            )
        );
        distributor.claim(providerB, 600 * USDC, proof, t.root);
        assertEq(token.balanceOf(address(distributor)), 200 * USDC, "the promised rest stays");
    }

    // ---------------------------------------------------------------- providerPool

    function test_providerPool_RoundsDown() public view {
        assertEq(distributor.providerPool(0), 0, "0");
        assertEq(distributor.providerPool(1), 0, "1");
        assertEq(distributor.providerPool(4), 3, "4");
        assertEq(distributor.providerPool(5), 4, "5");
        assertEq(distributor.providerPool(9), 7, "9");
        assertEq(distributor.providerPool(10), 8, "10");
        assertEq(distributor.providerPool(1_001), 800, "1001");
        assertEq(distributor.providerPool(1_000 * USDC), 800 * USDC, "1000 USDC");
    }

    // ---------------------------------------------------------------- end to end

    function test_claim_EndToEndFromVouchers() public {
        bytes32 aliceChannel = _deposit(alice, 1, 50 * USDC);
        bytes32 bobChannel = _deposit(bob, 1, 50 * USDC);
        IVoucherEscrow.Redemption[] memory batch = new IVoucherEscrow.Redemption[](2);
        batch[0] = _redemption(ALICE_PK, aliceChannel, 12_345_678, 12_345_678);
        batch[1] = _redemption(BOB_PK, bobChannel, 7_654_321, 7_654_321);
        _redeem(batch);
        uint256 redeemed = 12_345_678 + 7_654_321; // 19.999999 USDC
        uint256 pool = distributor.providerPool(redeemed);
        assertEq(pool, 15_999_999, "pool rounded down");

        Tree memory t = _tree3(9_000_000, 6_999_999, 0);
        _post(t);
        assertEq(token.balanceOf(treasury), redeemed - pool, "fee: 20% rounded up");
        _claim(t, 0);
        _claim(t, 1);
        assertEq(token.balanceOf(providerA) + token.balanceOf(providerB), pool, "providers got the pool");
        assertEq(token.balanceOf(address(distributor)), 0, "distributor empty");
    }

    // ---------------------------------------------------------------- fuzz

    function testFuzz_providerPool_FeeIsTwentyPercentRoundedUp(uint256 funded) public view {
        funded = bound(funded, 0, type(uint256).max / 10_000);
        uint256 pool = distributor.providerPool(funded);
        uint256 fee = funded - pool;
        assertEq(pool + fee, funded, "split is exact");
        assertLe(pool * 10_000, funded * 8_000, "pool is at most 80%");
        assertGe(fee * 10_000, funded * 2_000, "fee is at least 20%");
        assertLe(fee * 10_000, funded * 2_000 + 9_999, "fee exceeds 20% by under one unit");
    }

    function testFuzz_postRoot_FeesTrackCumulativeRedemptions(uint256 first, uint256 second, uint256 share) public {
        first = bound(first, 1, 1e15);
        second = bound(second, 0, 1e15);
        bytes32 channelId = _fundDistributor(1, first + second, first);
        uint256 promised = bound(share, 0, distributor.providerPool(first));
        _postTotal(ROOT_1, promised);
        assertEq(token.balanceOf(treasury), first - distributor.providerPool(first), "epoch 1 fee");

        if (second != 0) _redeem(_one(_redemption(ALICE_PK, channelId, first + second, first + second)));
        uint256 total = first + second;
        uint256 pool = distributor.providerPool(total);
        _postTotal(ROOT_2, bound(share, promised, pool));

        assertEq(token.balanceOf(treasury), total - pool, "cumulative fee");
        assertEq(distributor.feesPaid(), total - pool, "fees paid");
        assertEq(token.balanceOf(address(distributor)), pool, "distributor keeps the pool");
    }

    /// @dev Redemptions and direct transfers fund alike, and claims between posts change nothing about the fee.
    function testFuzz_postRoot_FeesTrackFundingFromEitherSource(
        uint256 redeemed,
        uint256 transferred,
        uint256 later,
        uint256 share
    ) public {
        redeemed = bound(redeemed, 0, 1e15);
        transferred = bound(transferred, 0, 1e15);
        later = bound(later, 0, 1e15);
        if (redeemed != 0) _fundDistributor(1, redeemed, redeemed);
        if (transferred != 0) _transferIn(transferred);
        uint256 funded = redeemed + transferred;
        assertEq(distributor.funded(), funded, "funded");

        // One provider is promised part of the pool and claims it before the next post.
        uint256 promised = bound(share, 0, distributor.providerPool(funded));
        address[] memory one = new address[](1);
        one[0] = providerA;
        uint256[] memory amounts = new uint256[](1);
        amounts[0] = promised;
        Tree memory t = _tree(one, amounts);
        _post(t);
        if (promised != 0) _claim(t, 0);
        assertEq(distributor.funded(), funded, "claims stay counted");

        if (later != 0) _transferIn(later);
        funded += later;
        uint256 pool = distributor.providerPool(funded);
        vm.expectEmit(address(distributor));
        emit IPayoutDistributor.RootPosted(2, ROOT_2, promised, funded, (funded - pool) - distributor.feesPaid());
        _postTotal(ROOT_2, promised);

        assertEq(distributor.feesPaid(), funded - pool, "cumulative fee");
        assertEq(token.balanceOf(treasury), funded - pool, "treasury");
        assertEq(token.balanceOf(address(distributor)), pool - promised, "distributor keeps the rest of the pool");
    }

    function testFuzz_claim_PaysEachProviderItsLeaf(uint256 redeemed, uint256 a, uint256 b, uint256 c) public {
        redeemed = bound(redeemed, 1, 1e15);
        _fundDistributor(1, redeemed, redeemed);
        uint256 pool = distributor.providerPool(redeemed);
        a = bound(a, 0, pool);
        b = bound(b, 0, pool - a);
        c = bound(c, 0, pool - a - b);
        Tree memory t = _tree3(a, b, c);
        _post(t);

        for (uint256 i; i < 3; ++i) {
            if (t.amounts[i] == 0) {
                vm.expectRevert(
                    abi.encodeWithSelector(IPayoutDistributor.NothingToClaim.selector, t.providers[i], 0, 0)
                );
                _claim(t, i);
            } else {
                assertEq(_claim(t, i), t.amounts[i], "claimed");
            }
            assertEq(token.balanceOf(t.providers[i]), t.amounts[i], "paid");
        }
        assertEq(distributor.totalClaimed(), a + b + c, "total claimed");
        assertEq(token.balanceOf(address(distributor)), pool - (a + b + c), "unpromised pool remains");
    }
}
