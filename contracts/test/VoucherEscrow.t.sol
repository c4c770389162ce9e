// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Base} from "./Base.t.sol";
import {VoucherEscrow} from "../src/VoucherEscrow.sol";
import {IVoucherEscrow} from "../src/interfaces/IVoucherEscrow.sol";
import {IAccessControl} from "@openzeppelin/contracts/access/IAccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";

contract VoucherEscrowTest is Base {
    uint256 internal constant SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141;

    function _assertChannel(bytes32 channelId, uint256 deposited, uint256 claimed) internal view {
        IVoucherEscrow.Channel memory c = escrow.channel(channelId);
        assertEq(c.deposit, deposited, "channel deposit");
        assertEq(c.claimed, claimed, "channel claimed");
    }

    function _initiate(address payer, bytes32 channelId) internal {
        vm.prank(payer);
        escrow.initiateWithdraw(channelId);
    }

    function _finalize(address payer, bytes32 channelId) internal returns (uint256) {
        vm.prank(payer);
        return escrow.finalizeWithdraw(channelId);
    }

    /// @dev The next call logs that `channelId`'s entry was skipped, for `reason`.
    function _expectSkip(bytes32 channelId, IVoucherEscrow.Skip reason) internal {
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.RedemptionSkipped(channelId, reason);
    }

    /// @dev Runs alice's whole exit from `channelId`: initiate, wait out the delay, finalize.
    function _close(bytes32 channelId) internal returns (uint256 refund) {
        _initiate(alice, channelId);
        vm.warp(block.timestamp + WITHDRAW_DELAY);
        refund = _finalize(alice, channelId);
    }

    // ---------------------------------------------------------------- constructor and pure helpers

    function test_constructor_StoresParameters() public view {
        assertEq(address(escrow.token()), address(token), "token");
        assertEq(escrow.distributor(), address(distributor), "distributor");
        assertEq(escrow.withdrawDelay(), WITHDRAW_DELAY, "withdraw delay");
        assertTrue(escrow.hasRole(escrow.DEFAULT_ADMIN_ROLE(), admin), "admin");
        assertTrue(escrow.hasRole(escrow.OPERATOR_ROLE(), operator), "operator");
        assertEq(escrow.totalRedeemed(), 0, "nothing redeemed");
        assertEq(escrow.CLOSED(), type(uint256).max, "CLOSED");
    }

    function test_RevertWhen_ConstructorGivenZeroToken() public {
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.ZeroAddress.selector));
        new VoucherEscrow(IERC20(address(0)), address(distributor), admin, WITHDRAW_DELAY);
    }

    function test_RevertWhen_ConstructorGivenZeroDistributor() public {
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.ZeroAddress.selector));
        new VoucherEscrow(token, address(0), admin, WITHDRAW_DELAY);
    }

    function test_RevertWhen_ConstructorGivenZeroAdmin() public {
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.ZeroAddress.selector));
        new VoucherEscrow(token, address(distributor), address(0), WITHDRAW_DELAY);
    }

    function test_channelIdOf_PutsPayerAboveSalt() public view {
        bytes32 id = escrow.channelIdOf(alice, 0x1234);
        assertEq(id, bytes32((uint256(uint160(alice)) << 96) | 0x1234), "layout");
        assertEq(escrow.payerOf(id), alice, "payer");
    }

    function testFuzz_channelIdOf_RoundTripsPayerAndSalt(address payer, uint96 salt) public view {
        bytes32 id = escrow.channelIdOf(payer, salt);
        assertEq(escrow.payerOf(id), payer, "payer");
        assertEq(uint256(id) & type(uint96).max, salt, "salt");
        assertEq(id, _channelId(payer, salt), "matches the off-chain formula");
    }

    function test_voucherDigest_IsEip712OverVoucherStruct() public view {
        bytes32 channelId = _channelId(alice, 1);
        bytes32 domain = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("Strata VoucherEscrow"),
                keccak256("1"),
                block.chainid,
                address(escrow)
            )
        );
        bytes32 typehash = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
        assertEq(escrow.VOUCHER_TYPEHASH(), typehash, "typehash");
        bytes32 structHash = keccak256(abi.encode(typehash, channelId, uint128(42)));
        assertEq(
            escrow.voucherDigest(channelId, 42), keccak256(abi.encodePacked("\x19\x01", domain, structHash)), "digest"
        );
    }

    // ---------------------------------------------------------------- deposit

    function test_deposit_CreditsChannel() public {
        bytes32 channelId = _channelId(alice, 1);
        _fund(alice, address(escrow), 100 * USDC);
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.ChannelFunded(channelId, alice, alice, 100 * USDC);
        vm.prank(alice);
        escrow.deposit(channelId, _u128(100 * USDC));

        _assertChannel(channelId, 100 * USDC, 0);
        assertEq(token.balanceOf(address(escrow)), 100 * USDC, "escrow holds it");
        assertEq(token.balanceOf(alice), 0, "payer paid");
    }

    function test_deposit_TopUpAccumulates() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _deposit(alice, 1, 25 * USDC);
        _assertChannel(channelId, 125 * USDC, 0);
    }

    function test_deposit_ThirdPartyFundsPayersChannel() public {
        bytes32 channelId = _channelId(alice, 1);
        _fund(stranger, address(escrow), 40 * USDC);
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.ChannelFunded(channelId, alice, stranger, 40 * USDC);
        vm.prank(stranger);
        escrow.deposit(channelId, _u128(40 * USDC));

        // The money is the payer's: only alice can take it back.
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.NotChannelPayer.selector, channelId, stranger));
        _initiate(stranger, channelId);
        _initiate(alice, channelId);
        vm.warp(block.timestamp + WITHDRAW_DELAY);
        assertEq(_finalize(alice, channelId), 40 * USDC, "refund");
        assertEq(token.balanceOf(alice), 40 * USDC, "refunded to the payer");
    }

    function test_deposit_SaltsSeparateChannels() public {
        bytes32 one = _deposit(alice, 1, 10 * USDC);
        bytes32 two = _deposit(alice, 2, 20 * USDC);
        _assertChannel(one, 10 * USDC, 0);
        _assertChannel(two, 20 * USDC, 0);
    }

    function test_RevertWhen_DepositZero() public {
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.ZeroAmount.selector));
        vm.prank(alice);
        escrow.deposit(_channelId(alice, 1), 0);
    }

    function test_RevertWhen_DepositToChannelWithZeroPayer() public {
        bytes32 channelId = bytes32(uint256(7)); // salt only, payer bits zero
        _fund(alice, address(escrow), 1);
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.InvalidChannelId.selector, channelId));
        vm.prank(alice);
        escrow.deposit(channelId, 1);
    }

    function test_RevertWhen_DepositToExitingChannel() public {
        bytes32 channelId = _deposit(alice, 1, 10 * USDC);
        _initiate(alice, channelId);
        uint256 exitAt = block.timestamp + WITHDRAW_DELAY;
        _fund(alice, address(escrow), 1);
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.ChannelExiting.selector, channelId, exitAt));
        vm.prank(alice);
        escrow.deposit(channelId, 1);
    }

    function test_RevertWhen_DepositToClosedChannel() public {
        bytes32 channelId = _deposit(alice, 1, 10 * USDC);
        _close(channelId);
        _fund(alice, address(escrow), 1);
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.ChannelClosed.selector, channelId));
        vm.prank(alice);
        escrow.deposit(channelId, 1);
    }

    function test_RevertWhen_ThirdPartyDepositsToClosedChannel() public {
        bytes32 channelId = _deposit(alice, 1, 10 * USDC);
        _close(channelId);
        // Nobody can strand money in the channel, not only its payer.
        _fund(stranger, address(escrow), 5 * USDC);
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.ChannelClosed.selector, channelId));
        vm.prank(stranger);
        escrow.deposit(channelId, _u128(5 * USDC));
        assertEq(token.balanceOf(stranger), 5 * USDC, "stranger keeps its money");
    }

    function test_RevertWhen_DepositOverflowsUint128() public {
        uint128 max = type(uint128).max;
        bytes32 channelId = _deposit(alice, 1, max);
        _fund(alice, address(escrow), 1);
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.DepositOverflow.selector, channelId, max, 1));
        vm.prank(alice);
        escrow.deposit(channelId, 1);
    }

    function test_RevertWhen_DepositWithoutAllowance() public {
        _mint(alice, 5);
        vm.expectRevert(abi.encodeWithSelector(IERC20Errors.ERC20InsufficientAllowance.selector, address(escrow), 0, 5));
        vm.prank(alice);
        escrow.deposit(_channelId(alice, 1), 5);
    }

    // ---------------------------------------------------------------- redeem

    function test_redeem_PaysVoucherToDistributor() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        IVoucherEscrow.Redemption[] memory batch = _one(_redemption(ALICE_PK, channelId, 30 * USDC, 30 * USDC));

        vm.expectEmit(address(token));
        emit IERC20.Transfer(address(escrow), address(distributor), 30 * USDC);
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.VouchersRedeemed(operator, 1, 30 * USDC, 30 * USDC);
        uint256 total = _redeem(batch);

        assertEq(total, 30 * USDC, "returned total");
        assertEq(escrow.totalRedeemed(), 30 * USDC, "total redeemed");
        assertEq(token.balanceOf(address(distributor)), 30 * USDC, "distributor funded");
        assertEq(token.balanceOf(address(escrow)), 70 * USDC, "rest stays");
        _assertChannel(channelId, 100 * USDC, 30 * USDC);
    }

    function test_redeem_ClaimsLessThanVoucherWhenChargedLess() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _redeem(_one(_redemption(ALICE_PK, channelId, 30 * USDC, 12 * USDC)));
        _assertChannel(channelId, 100 * USDC, 12 * USDC);
        // The same voucher later covers the rest of what was charged.
        _redeem(_one(_redemption(ALICE_PK, channelId, 30 * USDC, 30 * USDC)));
        _assertChannel(channelId, 100 * USDC, 30 * USDC);
        assertEq(escrow.totalRedeemed(), 30 * USDC, "total redeemed");
    }

    function test_redeem_CapsClaimAtDeposit() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.VouchersRedeemed(operator, 1, 100 * USDC, 100 * USDC);
        uint256 total = _redeem(_one(_redemption(ALICE_PK, channelId, 500 * USDC, 500 * USDC)));
        assertEq(total, 100 * USDC, "capped at deposit");
        _assertChannel(channelId, 100 * USDC, 100 * USDC);

        // A top-up lets the same voucher take what it could not before.
        _deposit(alice, 1, 50 * USDC);
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.VouchersRedeemed(operator, 1, 50 * USDC, 150 * USDC);
        total = _redeem(_one(_redemption(ALICE_PK, channelId, 500 * USDC, 500 * USDC)));
        assertEq(total, 50 * USDC, "the top-up");
        assertEq(escrow.totalRedeemed(), 150 * USDC, "total redeemed");
    }

    function test_redeem_BatchOfManyChannelsPaysOnlyIncreases() public {
        uint256 n = 12;
        bytes32[] memory ids = new bytes32[](n);
        uint256[] memory pks = new uint256[](n);
        for (uint96 i; i < n; ++i) {
            (address payer, uint256 pk) = i % 2 == 0 ? (alice, ALICE_PK) : (bob, BOB_PK);
            ids[i] = _deposit(payer, i, 100 * USDC);
            pks[i] = pk;
        }

        // Round one: channel i is charged 5 * (i + 1).
        IVoucherEscrow.Redemption[] memory batch = new IVoucherEscrow.Redemption[](n);
        uint256 expected;
        for (uint256 i; i < n; ++i) {
            uint128 amount = _u128(5 * USDC * (i + 1));
            batch[i] = _redemption(pks[i], ids[i], amount, amount);
            expected += amount;
        }
        assertEq(_redeem(batch), expected, "round one");
        uint256 roundOne = expected;

        // Round two: channel i is charged 10 * (i + 1), which passes the 100 deposit from i = 10 on.
        expected = 0;
        for (uint256 i; i < n; ++i) {
            uint128 amount = _u128(10 * USDC * (i + 1));
            batch[i] = _redemption(pks[i], ids[i], amount, amount);
            uint256 capped = amount < 100 * USDC ? amount : 100 * USDC;
            expected += capped - 5 * USDC * (i + 1);
        }
        // One event for the whole batch, one transfer for the whole batch.
        vm.expectEmit(address(token));
        emit IERC20.Transfer(address(escrow), address(distributor), expected);
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.VouchersRedeemed(operator, n, expected, roundOne + expected);
        assertEq(_redeem(batch), expected, "round two pays increases only");

        assertEq(escrow.totalRedeemed(), roundOne + expected, "total redeemed");
        assertEq(token.balanceOf(address(distributor)), roundOne + expected, "distributor funded");
        for (uint256 i; i < n; ++i) {
            uint256 charged = 10 * USDC * (i + 1);
            _assertChannel(ids[i], 100 * USDC, charged < 100 * USDC ? charged : 100 * USDC);
        }
        assertEq(token.balanceOf(address(escrow)), n * 100 * USDC - roundOne - expected, "escrow keeps the rest");
    }

    function test_redeem_SameChannelTwiceInBatchPaysTheHigher() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        IVoucherEscrow.Redemption[] memory batch = new IVoucherEscrow.Redemption[](2);
        batch[0] = _redemption(ALICE_PK, channelId, 30 * USDC, 30 * USDC);
        batch[1] = _redemption(ALICE_PK, channelId, 50 * USDC, 50 * USDC);
        // The event counts batch entries, not distinct channels.
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.VouchersRedeemed(operator, 2, 50 * USDC, 50 * USDC);
        assertEq(_redeem(batch), 50 * USDC, "total");
        _assertChannel(channelId, 100 * USDC, 50 * USDC);
    }

    function test_redeem_EmptyBatchEmitsZeros() public {
        IVoucherEscrow.Redemption[] memory batch = new IVoucherEscrow.Redemption[](0);
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.VouchersRedeemed(operator, 0, 0, 0);
        assertEq(_redeem(batch), 0, "total");
        assertEq(escrow.totalRedeemed(), 0, "total redeemed");
        assertEq(token.balanceOf(address(distributor)), 0, "distributor");
    }

    function test_redeem_EmptyBatchKeepsTotalRedeemed() public {
        _fundDistributor(1, 100 * USDC, 30 * USDC);
        IVoucherEscrow.Redemption[] memory batch = new IVoucherEscrow.Redemption[](0);
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.VouchersRedeemed(operator, 0, 0, 30 * USDC);
        assertEq(_redeem(batch), 0, "total");
        assertEq(escrow.totalRedeemed(), 30 * USDC, "total redeemed");
        assertEq(token.balanceOf(address(distributor)), 30 * USDC, "distributor");
    }

    function test_redeem_AfterDelayUntilFinalized() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _initiate(alice, channelId);
        // The payer could finalize now but has not: the operator may still redeem.
        vm.warp(block.timestamp + WITHDRAW_DELAY + 1 days);
        assertEq(_redeem(_one(_redemption(ALICE_PK, channelId, 60 * USDC, 60 * USDC))), 60 * USDC, "redeemed");
        assertEq(_finalize(alice, channelId), 40 * USDC, "the rest");
    }

    function test_RevertWhen_RedeemCallerIsNotOperator() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        IVoucherEscrow.Redemption[] memory batch = _one(_redemption(ALICE_PK, channelId, 10, 10));
        bytes32 role = escrow.OPERATOR_ROLE();
        vm.expectRevert(abi.encodeWithSelector(IAccessControl.AccessControlUnauthorizedAccount.selector, alice, role));
        vm.prank(alice);
        escrow.redeem(batch);
    }

    function test_RevertWhen_RedeemAfterOperatorRevoked() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        IVoucherEscrow.Redemption[] memory batch = _one(_redemption(ALICE_PK, channelId, 10, 10));
        bytes32 role = escrow.OPERATOR_ROLE();
        vm.prank(admin);
        escrow.revokeRole(role, operator);
        vm.expectRevert(
            abi.encodeWithSelector(IAccessControl.AccessControlUnauthorizedAccount.selector, operator, role)
        );
        _redeem(batch);
    }

    function test_redeem_SkipsClaimAboveVoucher() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        IVoucherEscrow.Redemption[] memory batch = _one(_redemption(ALICE_PK, channelId, 30 * USDC, 30 * USDC + 1));
        _expectSkip(channelId, IVoucherEscrow.Skip.ClaimAboveVoucher);
        assertEq(_redeem(batch), 0, "skipped");
    }

    function test_redeem_SkipsVoucherSignedByAnotherKey() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        IVoucherEscrow.Redemption[] memory batch = _one(_redemption(BOB_PK, channelId, 10, 10));
        _expectSkip(channelId, IVoucherEscrow.Skip.InvalidVoucherSignature);
        assertEq(_redeem(batch), 0, "skipped");
    }

    function test_redeem_SkipsVoucherAmountAltered() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        IVoucherEscrow.Redemption memory red = _redemption(ALICE_PK, channelId, 10 * USDC, 10 * USDC);
        red.maxClaimableAmount = _u128(90 * USDC);
        red.claimTo = _u128(90 * USDC);
        _expectSkip(channelId, IVoucherEscrow.Skip.InvalidVoucherSignature);
        assertEq(_redeem(_one(red)), 0, "skipped");
    }

    function test_redeem_SkipsVoucherOfAnotherChannel() public {
        bytes32 paid = _deposit(alice, 1, 100 * USDC);
        bytes32 other = _deposit(alice, 2, 100 * USDC);
        IVoucherEscrow.Redemption memory red = _redemption(ALICE_PK, paid, 10 * USDC, 10 * USDC);
        red.channelId = other;
        _expectSkip(other, IVoucherEscrow.Skip.InvalidVoucherSignature);
        assertEq(_redeem(_one(red)), 0, "skipped");
    }

    function test_redeem_SkipsVoucherSignedForAnotherEscrow() public {
        VoucherEscrow other = new VoucherEscrow(token, address(distributor), admin, WITHDRAW_DELAY);
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(ALICE_PK, other.voucherDigest(channelId, 10));
        bytes32 vs = bytes32(uint256(s) | (uint256(v - 27) << 255));
        IVoucherEscrow.Redemption memory red = IVoucherEscrow.Redemption(channelId, 10, 10, r, vs);
        _expectSkip(channelId, IVoucherEscrow.Skip.InvalidVoucherSignature);
        assertEq(_redeem(_one(red)), 0, "skipped");
    }

    function test_redeem_SkipsSignatureWithHighS() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        (, bytes32 r,) = vm.sign(ALICE_PK, escrow.voucherDigest(channelId, 10));
        // ECDSA accepts only s in the lower half of the curve order, so no signature has a second, malleated form.
        uint256 highS = SECP256K1_N / 2 + 1;
        IVoucherEscrow.Redemption memory red = IVoucherEscrow.Redemption(channelId, 10, 10, r, bytes32(highS));
        _expectSkip(channelId, IVoucherEscrow.Skip.InvalidVoucherSignature);
        assertEq(_redeem(_one(red)), 0, "skipped");
    }

    function test_redeem_SkipsGarbageSignature() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        IVoucherEscrow.Redemption memory red = IVoucherEscrow.Redemption(channelId, 10, 10, bytes32(0), bytes32(0));
        _expectSkip(channelId, IVoucherEscrow.Skip.InvalidVoucherSignature);
        assertEq(_redeem(_one(red)), 0, "skipped");
    }

    function test_redeem_SkipsReplayedVoucher() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        IVoucherEscrow.Redemption[] memory batch = _one(_redemption(ALICE_PK, channelId, 50 * USDC, 50 * USDC));
        _redeem(batch);
        _expectSkip(channelId, IVoucherEscrow.Skip.NothingToRedeem);
        assertEq(_redeem(batch), 0, "skipped");
    }

    function test_redeem_SkipsDecreasingVoucher() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _redeem(_one(_redemption(ALICE_PK, channelId, 50 * USDC, 50 * USDC)));
        IVoucherEscrow.Redemption[] memory batch = _one(_redemption(ALICE_PK, channelId, 40 * USDC, 40 * USDC));
        _expectSkip(channelId, IVoucherEscrow.Skip.NothingToRedeem);
        assertEq(_redeem(batch), 0, "skipped");
    }

    function test_redeem_SkipsUnfundedChannel() public {
        bytes32 channelId = _channelId(alice, 9);
        IVoucherEscrow.Redemption[] memory batch = _one(_redemption(ALICE_PK, channelId, 10, 10));
        _expectSkip(channelId, IVoucherEscrow.Skip.NothingToRedeem);
        assertEq(_redeem(batch), 0, "skipped");
    }

    function test_redeem_SkipsFullyClaimedChannel() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _redeem(_one(_redemption(ALICE_PK, channelId, 100 * USDC, 100 * USDC)));
        IVoucherEscrow.Redemption[] memory batch = _one(_redemption(ALICE_PK, channelId, 150 * USDC, 150 * USDC));
        _expectSkip(channelId, IVoucherEscrow.Skip.NothingToRedeem);
        assertEq(_redeem(batch), 0, "skipped");
    }

    function test_redeem_BadEntryIsSkippedAndTheRestPays() public {
        bytes32 good = _deposit(alice, 1, 100 * USDC);
        bytes32 bad = _deposit(bob, 1, 100 * USDC);
        IVoucherEscrow.Redemption[] memory batch = new IVoucherEscrow.Redemption[](2);
        batch[0] = _redemption(ALICE_PK, bad, 10 * USDC, 10 * USDC);
        batch[1] = _redemption(ALICE_PK, good, 10 * USDC, 10 * USDC);
        _expectSkip(bad, IVoucherEscrow.Skip.InvalidVoucherSignature);
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.VouchersRedeemed(operator, 1, 10 * USDC, 10 * USDC);
        assertEq(_redeem(batch), 10 * USDC, "the good entry paid");

        _assertChannel(good, 100 * USDC, 10 * USDC);
        _assertChannel(bad, 100 * USDC, 0);
        assertEq(token.balanceOf(address(distributor)), 10 * USDC, "distributor");
    }

    /// @dev The race an exit makes: the payer finalizes in the block before the operator's batch lands. Its entry
    /// pays nothing and every other channel in the batch still pays.
    function test_redeem_ExitFinalizedJustBeforeTheBatchSkipsOnlyThatChannel() public {
        bytes32 leaving = _deposit(alice, 1, 100 * USDC);
        bytes32 staying = _deposit(bob, 1, 100 * USDC);
        IVoucherEscrow.Redemption[] memory batch = new IVoucherEscrow.Redemption[](2);
        batch[0] = _redemption(ALICE_PK, leaving, 40 * USDC, 40 * USDC);
        batch[1] = _redemption(BOB_PK, staying, 25 * USDC, 25 * USDC);
        assertEq(_close(leaving), 100 * USDC, "alice took everything back");

        _expectSkip(leaving, IVoucherEscrow.Skip.NothingToRedeem);
        assertEq(_redeem(batch), 25 * USDC, "bob's entry paid");
        _assertChannel(staying, 100 * USDC, 25 * USDC);
        assertEq(escrow.totalRedeemed(), 25 * USDC, "total redeemed");
    }

    function test_redeem_BatchWithNoEntryThatPaysMovesZero() public {
        bytes32 one = _deposit(alice, 1, 100 * USDC);
        bytes32 two = _deposit(alice, 2, 100 * USDC);
        IVoucherEscrow.Redemption[] memory batch = new IVoucherEscrow.Redemption[](2);
        batch[0] = _redemption(ALICE_PK, one, 10 * USDC, 10 * USDC);
        batch[1] = _redemption(ALICE_PK, two, 20 * USDC, 20 * USDC);
        _redeem(batch);
        // Every entry is spent: a rerun of the same batch (a resumed epoch) pays and moves nothing.
        _expectSkip(one, IVoucherEscrow.Skip.NothingToRedeem);
        _expectSkip(two, IVoucherEscrow.Skip.NothingToRedeem);
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.VouchersRedeemed(operator, 0, 0, 30 * USDC);
        assertEq(_redeem(batch), 0, "nothing paid");
        assertEq(escrow.totalRedeemed(), 30 * USDC, "total redeemed");
        assertEq(token.balanceOf(address(distributor)), 30 * USDC, "distributor");
    }

    function test_redeem_SkipsOldVoucherAfterExit() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        // Alice signed for up to 100 but was charged only 30 before she left.
        IVoucherEscrow.Redemption[] memory old = _one(_redemption(ALICE_PK, channelId, 100 * USDC, 100 * USDC));
        _redeem(_one(_redemption(ALICE_PK, channelId, 100 * USDC, 30 * USDC)));
        assertEq(_close(channelId), 70 * USDC, "refund");
        _assertChannel(channelId, 30 * USDC, 30 * USDC);

        _expectSkip(channelId, IVoucherEscrow.Skip.NothingToRedeem);
        assertEq(_redeem(old), 0, "skipped");

        // No deposit can ever put something under the old voucher again.
        _fund(alice, address(escrow), 50 * USDC);
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.ChannelClosed.selector, channelId));
        vm.prank(alice);
        escrow.deposit(channelId, _u128(50 * USDC));
        vm.warp(block.timestamp + 365 days);
        _expectSkip(channelId, IVoucherEscrow.Skip.NothingToRedeem);
        assertEq(_redeem(old), 0, "skipped");
        assertEq(token.balanceOf(alice), 120 * USDC, "alice keeps the refund and what she could not deposit");
    }

    function test_redeem_SkipsNeverRedeemedVoucherAfterExit() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        IVoucherEscrow.Redemption[] memory old = _one(_redemption(ALICE_PK, channelId, 40 * USDC, 40 * USDC));
        // The operator missed the delay: the whole deposit went back, the voucher finds nothing.
        assertEq(_close(channelId), 100 * USDC, "refund");
        _expectSkip(channelId, IVoucherEscrow.Skip.NothingToRedeem);
        assertEq(_redeem(old), 0, "skipped");
    }

    // ---------------------------------------------------------------- initiateWithdraw and finalizeWithdraw

    function test_initiateWithdraw_StartsDelay() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        uint256 exitAt = block.timestamp + WITHDRAW_DELAY;
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.WithdrawInitiated(channelId, alice, exitAt);
        _initiate(alice, channelId);
        assertEq(escrow.withdrawableAt(channelId), exitAt, "withdrawableAt");
    }

    function test_RevertWhen_InitiateWithdrawCallerIsNotPayer() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.NotChannelPayer.selector, channelId, operator));
        _initiate(operator, channelId);
    }

    function test_RevertWhen_InitiateWithdrawTwice() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _initiate(alice, channelId);
        uint256 exitAt = block.timestamp + WITHDRAW_DELAY;
        vm.warp(block.timestamp + 1 hours);
        // A second request must not push the exit back, nor bring it forward.
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.ChannelExiting.selector, channelId, exitAt));
        _initiate(alice, channelId);
    }

    function test_RevertWhen_InitiateWithdrawOnClosedChannel() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _close(channelId);
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.ChannelClosed.selector, channelId));
        _initiate(alice, channelId);
        assertEq(escrow.withdrawableAt(channelId), escrow.CLOSED(), "still closed");
    }

    function test_RevertWhen_InitiateWithdrawOnClosedChannelCallerIsNotPayer() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _close(channelId);
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.NotChannelPayer.selector, channelId, bob));
        _initiate(bob, channelId);
    }

    function test_finalizeWithdraw_ReturnsUnclaimedToPayer() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _redeem(_one(_redemption(ALICE_PK, channelId, 30 * USDC, 30 * USDC)));
        _initiate(alice, channelId);
        vm.warp(block.timestamp + WITHDRAW_DELAY);

        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.WithdrawFinalized(channelId, alice, 70 * USDC);
        uint256 amount = _finalize(alice, channelId);

        assertEq(amount, 70 * USDC, "returned");
        assertEq(token.balanceOf(alice), 70 * USDC, "payer refunded");
        assertEq(token.balanceOf(address(escrow)), 0, "escrow empty");
        assertEq(escrow.withdrawableAt(channelId), escrow.CLOSED(), "channel closed");
        _assertChannel(channelId, 30 * USDC, 30 * USDC);
    }

    function test_finalizeWithdraw_OperatorRedeemsDuringDelay() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _initiate(alice, channelId);
        vm.warp(block.timestamp + WITHDRAW_DELAY - 1);
        _redeem(_one(_redemption(ALICE_PK, channelId, 45 * USDC, 45 * USDC)));

        vm.warp(block.timestamp + 1);
        assertEq(_finalize(alice, channelId), 55 * USDC, "what was not redeemed");
        assertEq(token.balanceOf(address(distributor)), 45 * USDC, "operator was paid");
    }

    function test_finalizeWithdraw_NothingLeftPaysZero() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _redeem(_one(_redemption(ALICE_PK, channelId, 100 * USDC, 100 * USDC)));
        _initiate(alice, channelId);
        vm.warp(block.timestamp + WITHDRAW_DELAY);
        vm.expectEmit(address(escrow));
        emit IVoucherEscrow.WithdrawFinalized(channelId, alice, 0);
        assertEq(_finalize(alice, channelId), 0, "nothing");
        assertEq(token.balanceOf(alice), 0, "payer");
    }

    function test_finalizeWithdraw_PayerComesBackWithNewSalt() public {
        bytes32 closed = _deposit(alice, 1, 100 * USDC);
        IVoucherEscrow.Redemption[] memory old = _one(_redemption(ALICE_PK, closed, 30 * USDC, 30 * USDC));
        _redeem(old);
        _close(closed);

        // A new salt is a new channel: its own deposit, its own cumulative count from zero.
        bytes32 fresh = _deposit(alice, 2, 50 * USDC);
        _assertChannel(fresh, 50 * USDC, 0);
        assertEq(escrow.withdrawableAt(fresh), 0, "open");
        assertEq(_redeem(_one(_redemption(ALICE_PK, fresh, 20 * USDC, 20 * USDC))), 20 * USDC, "new voucher");
        _assertChannel(closed, 30 * USDC, 30 * USDC);
        _expectSkip(closed, IVoucherEscrow.Skip.NothingToRedeem);
        assertEq(_redeem(old), 0, "skipped");

        // And it can be exited in turn.
        assertEq(_close(fresh), 30 * USDC, "second exit");
    }

    function test_RevertWhen_FinalizeWithdrawBeforeDelay() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _initiate(alice, channelId);
        uint256 exitAt = block.timestamp + WITHDRAW_DELAY;
        vm.warp(exitAt - 1);
        vm.expectRevert(
            abi.encodeWithSelector(IVoucherEscrow.WithdrawDelayNotElapsed.selector, channelId, exitAt, exitAt - 1)
        );
        _finalize(alice, channelId);
    }

    function test_RevertWhen_FinalizeWithdrawNotInitiated() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.ChannelNotExiting.selector, channelId));
        _finalize(alice, channelId);
    }

    function test_RevertWhen_FinalizeWithdrawTwice() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _close(channelId);
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.ChannelClosed.selector, channelId));
        _finalize(alice, channelId);
        assertEq(token.balanceOf(alice), 100 * USDC, "refunded once");
    }

    function test_RevertWhen_FinalizeWithdrawOnClosedChannelCallerIsNotPayer() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _close(channelId);
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.NotChannelPayer.selector, channelId, bob));
        _finalize(bob, channelId);
    }

    function test_RevertWhen_FinalizeWithdrawCallerIsNotPayer() public {
        bytes32 channelId = _deposit(alice, 1, 100 * USDC);
        _initiate(alice, channelId);
        vm.warp(block.timestamp + WITHDRAW_DELAY);
        vm.expectRevert(abi.encodeWithSelector(IVoucherEscrow.NotChannelPayer.selector, channelId, bob));
        _finalize(bob, channelId);
    }

    // ---------------------------------------------------------------- fuzz

    function testFuzz_redeem_PaysClaimCappedAtDeposit(uint128 deposited, uint128 voucher, uint128 claimTo) public {
        deposited = _u128(bound(deposited, 1, type(uint128).max));
        voucher = _u128(bound(voucher, 1, type(uint128).max));
        claimTo = _u128(bound(claimTo, 1, voucher));
        bytes32 channelId = _deposit(alice, 1, deposited);

        uint256 expected = claimTo < deposited ? claimTo : deposited;
        assertEq(_redeem(_one(_redemption(ALICE_PK, channelId, voucher, claimTo))), expected, "paid");
        assertEq(token.balanceOf(address(distributor)), expected, "distributor");
        assertEq(token.balanceOf(address(escrow)), deposited - expected, "escrow");
        _assertChannel(channelId, deposited, expected);
    }

    function testFuzz_redeem_SecondVoucherPaysOnlyIncrease(uint128 deposited, uint128 first, uint128 second) public {
        deposited = _u128(bound(deposited, 1, 1e18));
        first = _u128(bound(first, 1, 2e18));
        second = _u128(bound(second, 1, 2e18));
        bytes32 channelId = _deposit(alice, 1, deposited);
        uint256 firstPaid = first < deposited ? first : deposited;
        uint256 secondCapped = second < deposited ? second : deposited;

        _redeem(_one(_redemption(ALICE_PK, channelId, first, first)));
        IVoucherEscrow.Redemption[] memory batch = _one(_redemption(ALICE_PK, channelId, second, second));
        if (secondCapped <= firstPaid) {
            _expectSkip(channelId, IVoucherEscrow.Skip.NothingToRedeem);
            assertEq(_redeem(batch), 0, "skipped");
        } else {
            assertEq(_redeem(batch), secondCapped - firstPaid, "increase only");
        }
        uint256 claimed = secondCapped > firstPaid ? secondCapped : firstPaid;
        _assertChannel(channelId, deposited, claimed);
        assertEq(escrow.totalRedeemed(), claimed, "total redeemed");
        assertEq(token.balanceOf(address(escrow)) + escrow.totalRedeemed(), deposited, "conserved");
    }

    function testFuzz_finalizeWithdraw_ReturnsExactlyUnclaimed(uint128 deposited, uint128 claimTo, uint256 late)
        public
    {
        deposited = _u128(bound(deposited, 1, type(uint128).max));
        claimTo = _u128(bound(claimTo, 0, deposited));
        late = bound(late, 0, 365 days);
        bytes32 channelId = _deposit(alice, 1, deposited);
        if (claimTo != 0) _redeem(_one(_redemption(ALICE_PK, channelId, claimTo, claimTo)));
        _initiate(alice, channelId);
        vm.warp(block.timestamp + WITHDRAW_DELAY + late);
        assertEq(_finalize(alice, channelId), deposited - claimTo, "refund");
        assertEq(token.balanceOf(alice) + token.balanceOf(address(distributor)), deposited, "all accounted");
        assertEq(escrow.withdrawableAt(channelId), escrow.CLOSED(), "closed");
        _assertChannel(channelId, claimTo, claimTo);
    }

    /// @dev Whatever voucher alice signed for a channel, once she has left it pays nothing, ever.
    function testFuzz_redeem_NothingAfterExit(uint128 deposited, uint128 charged, uint128 voucher, uint256 late)
        public
    {
        deposited = _u128(bound(deposited, 1, type(uint128).max));
        charged = _u128(bound(charged, 0, deposited));
        voucher = _u128(bound(voucher, 1, type(uint128).max));
        late = bound(late, 0, 3650 days);
        bytes32 channelId = _deposit(alice, 1, deposited);
        if (charged != 0) _redeem(_one(_redemption(ALICE_PK, channelId, charged, charged)));
        _close(channelId);
        vm.warp(block.timestamp + late);

        IVoucherEscrow.Redemption[] memory batch = _one(_redemption(ALICE_PK, channelId, voucher, voucher));
        _expectSkip(channelId, IVoucherEscrow.Skip.NothingToRedeem);
        assertEq(_redeem(batch), 0, "skipped");
        assertEq(escrow.totalRedeemed(), charged, "total redeemed");
        assertEq(token.balanceOf(address(escrow)), 0, "escrow empty");
    }
}
