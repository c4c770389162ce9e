// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Base} from "./Base.t.sol";
import {BatchSettlement} from "../src/BatchSettlement.sol";
import {ERC3009DepositCollector} from "../src/ERC3009DepositCollector.sol";
import {IBatchSettlement} from "../src/interfaces/IBatchSettlement.sol";
import {IDepositCollector} from "../src/interfaces/IDepositCollector.sol";
import {ERC3009} from "@openzeppelin/contracts/token/ERC20/extensions/draft-ERC3009.sol";

/// @notice The one cheatcode these tests need beyond utils/Vm.sol: placing runtime code at an address.
interface VmEtch {
    function etch(address target, bytes calldata newRuntimeBytecode) external;
}

/// @notice A collector that delivers nothing: BatchSettlement must not credit what it did not receive.
contract EmptyCollector is IDepositCollector {
    function collect(address, address, uint256, bytes32, bytes calldata) external {}
}

/// @notice The two contracts run from x402's fixed addresses, with their runtime code copied there the way the
/// devnet does it (no constructor runs at those addresses), so these tests also show that nothing depends on
/// constructor-written storage.
contract BatchSettlementTest is Base {
    address internal constant BATCH_ADDRESS = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;
    address internal constant COLLECTOR_ADDRESS = 0x4020806089470a89826cB9fB1f4059150b550004;
    bytes32 internal constant RECEIVE_WITH_AUTHORIZATION_TYPEHASH = keccak256(
        "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );
    uint40 internal constant DELAY = 1 hours;
    uint256 internal constant SESSION_PK = 0x5E55;
    uint256 internal constant AUTHORIZER_PK = 0xA7;
    uint256 internal constant DEPOSIT = 100 * USDC;

    BatchSettlement internal batch;
    address internal session;
    address internal authorizer;
    address internal receiver;
    address internal facilitator;

    function setUp() public override {
        super.setUp();
        VmEtch(address(vm)).etch(BATCH_ADDRESS, address(new BatchSettlement()).code);
        VmEtch(address(vm)).etch(COLLECTOR_ADDRESS, address(new ERC3009DepositCollector(BATCH_ADDRESS)).code);
        batch = BatchSettlement(BATCH_ADDRESS);
        session = vm.addr(SESSION_PK);
        authorizer = vm.addr(AUTHORIZER_PK);
        receiver = providerA;
        facilitator = operator;
        vm.label(BATCH_ADDRESS, "BatchSettlement");
        vm.label(COLLECTOR_ADDRESS, "ERC3009DepositCollector");
    }

    // ---------------------------------------------------------------- helpers

    function _config(bytes32 salt) internal view returns (IBatchSettlement.ChannelConfig memory) {
        return IBatchSettlement.ChannelConfig(alice, session, receiver, authorizer, address(token), DELAY, salt);
    }

    /// @dev alice's signature of a ReceiveWithAuthorization to the collector, nonce bound to `channelId` and `salt`.
    function _receiveSignature(bytes32 channelId, uint256 amount, uint256 salt) internal view returns (bytes memory) {
        bytes32 nonce = keccak256(abi.encode(channelId, salt));
        bytes32 structHash = keccak256(
            abi.encode(
                RECEIVE_WITH_AUTHORIZATION_TYPEHASH,
                alice,
                COLLECTOR_ADDRESS,
                amount,
                0,
                block.timestamp + 1 hours,
                nonce
            )
        );
        (uint8 v, bytes32 r, bytes32 s) =
            vm.sign(ALICE_PK, keccak256(abi.encodePacked("\x19\x01", token.DOMAIN_SEPARATOR(), structHash)));
        return abi.encodePacked(r, s, v);
    }

    function _collectorData(bytes32 channelId, uint256 amount, uint256 salt) internal view returns (bytes memory) {
        return abi.encode(0, block.timestamp + 1 hours, salt, _receiveSignature(channelId, amount, salt));
    }

    /// @dev Mints `amount` to alice and has the facilitator deposit it with her signed authorization.
    function _deposit(IBatchSettlement.ChannelConfig memory config, uint256 amount) internal returns (bytes32 id) {
        id = batch.getChannelId(config);
        _mint(alice, amount);
        bytes memory data = _collectorData(id, amount, uint256(keccak256(abi.encode(id, amount, block.timestamp))));
        vm.prank(facilitator);
        batch.deposit(config, _u128(amount), COLLECTOR_ADDRESS, data);
    }

    function _sign(uint256 pk, bytes32 digest) internal pure returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(pk, digest);
        return abi.encodePacked(r, s, v);
    }

    function _voucherClaim(
        uint256 signerPk,
        IBatchSettlement.ChannelConfig memory config,
        uint256 maxClaimable,
        uint256 total
    ) internal view returns (IBatchSettlement.VoucherClaim[] memory claims) {
        bytes32 id = batch.getChannelId(config);
        claims = new IBatchSettlement.VoucherClaim[](1);
        claims[0] = IBatchSettlement.VoucherClaim(
            IBatchSettlement.Voucher(config, _u128(maxClaimable)),
            _sign(signerPk, batch.getVoucherDigest(id, _u128(maxClaimable))),
            _u128(total)
        );
    }

    function _claim(IBatchSettlement.VoucherClaim[] memory claims) internal {
        vm.prank(authorizer);
        batch.claim(claims);
    }

    function _assertChannel(bytes32 id, uint256 balance, uint256 claimed) internal view {
        (uint128 b, uint128 c) = batch.channels(id);
        assertEq(b, balance, "channel balance");
        assertEq(c, claimed, "channel totalClaimed");
    }

    // ---------------------------------------------------------------- deposit

    function test_deposit_CreditsChannelThroughCollector() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = batch.getChannelId(config);
        _mint(alice, DEPOSIT);
        uint256 salt = 7;
        bytes memory data = _collectorData(id, DEPOSIT, salt);
        vm.expectEmit(BATCH_ADDRESS);
        emit IBatchSettlement.Deposited(id, alice, COLLECTOR_ADDRESS, facilitator, _u128(DEPOSIT));
        vm.prank(facilitator);
        batch.deposit(config, _u128(DEPOSIT), COLLECTOR_ADDRESS, data);

        _assertChannel(id, DEPOSIT, 0);
        assertEq(token.balanceOf(BATCH_ADDRESS), DEPOSIT, "contract holds the deposit");
        assertEq(token.balanceOf(COLLECTOR_ADDRESS), 0, "collector keeps nothing");
        assertEq(token.balanceOf(alice), 0, "payer paid");
        assertTrue(token.authorizationState(alice, keccak256(abi.encode(id, salt))), "nonce spent");
    }

    function test_deposit_TopsUpAnExistingChannel() public {
        bytes32 id = _deposit(_config("a"), DEPOSIT);
        vm.warp(block.timestamp + 1);
        _deposit(_config("a"), 5 * USDC);
        _assertChannel(id, DEPOSIT + 5 * USDC, 0);
    }

    function test_RevertWhen_DepositAuthorizationBoundToAnotherChannel() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 otherId = batch.getChannelId(_config("b"));
        _mint(alice, DEPOSIT);
        // Signed for channel b: the collector derives the nonce from channel a, so the signature does not verify.
        bytes memory data = _collectorData(otherId, DEPOSIT, 7);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009InvalidSignature.selector));
        vm.prank(facilitator);
        batch.deposit(config, _u128(DEPOSIT), COLLECTOR_ADDRESS, data);
    }

    function test_RevertWhen_DepositReplaysAnAuthorization() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = batch.getChannelId(config);
        _mint(alice, 2 * DEPOSIT);
        bytes memory data = _collectorData(id, DEPOSIT, 7);
        vm.prank(facilitator);
        batch.deposit(config, _u128(DEPOSIT), COLLECTOR_ADDRESS, data);
        vm.expectRevert(
            abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, alice, keccak256(abi.encode(id, 7)))
        );
        vm.prank(facilitator);
        batch.deposit(config, _u128(DEPOSIT), COLLECTOR_ADDRESS, data);
    }

    function test_RevertWhen_CollectorCalledByAnyoneButBatchSettlement() public {
        bytes32 id = batch.getChannelId(_config("a"));
        _mint(alice, DEPOSIT);
        bytes memory data = _collectorData(id, DEPOSIT, 7);
        vm.expectRevert(abi.encodeWithSelector(ERC3009DepositCollector.NotBatchSettlement.selector, stranger));
        vm.prank(stranger);
        ERC3009DepositCollector(COLLECTOR_ADDRESS).collect(alice, address(token), DEPOSIT, id, data);
    }

    function test_RevertWhen_CollectorDeliversNothing() public {
        EmptyCollector empty = new EmptyCollector();
        vm.expectRevert(
            abi.encodeWithSelector(IBatchSettlement.DepositNotDelivered.selector, address(empty), DEPOSIT, 0)
        );
        batch.deposit(_config("a"), _u128(DEPOSIT), address(empty), "");
    }

    function test_RevertWhen_WithdrawDelayOutOfRange() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        config.withdrawDelay = 899;
        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.WithdrawDelayOutOfRange.selector, uint40(899)));
        batch.deposit(config, _u128(DEPOSIT), COLLECTOR_ADDRESS, "");
        config.withdrawDelay = 30 days + 1;
        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.WithdrawDelayOutOfRange.selector, uint40(30 days + 1)));
        batch.deposit(config, _u128(DEPOSIT), COLLECTOR_ADDRESS, "");
    }

    function test_RevertWhen_DepositIsZero() public {
        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.ZeroAmount.selector));
        batch.deposit(_config("a"), 0, COLLECTOR_ADDRESS, "");
    }

    function test_getChannelId_IsBoundToTheContractAddress() public {
        BatchSettlement elsewhere = new BatchSettlement();
        IBatchSettlement.ChannelConfig memory config = _config("a");
        assertTrue(elsewhere.getChannelId(config) != batch.getChannelId(config), "the domain names the address");
        (, string memory name, string memory version,, address verifyingContract,,) = batch.eip712Domain();
        assertEq(name, "x402 Batch Settlement", "domain name");
        assertEq(version, "1", "domain version");
        assertEq(verifyingContract, BATCH_ADDRESS, "domain contract");
    }

    // ---------------------------------------------------------------- claim

    function test_claim_ByReceiverAuthorizer() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        vm.expectEmit(BATCH_ADDRESS);
        emit IBatchSettlement.Claimed(id, receiver, address(token), _u128(3 * USDC), _u128(3 * USDC));
        _claim(_voucherClaim(SESSION_PK, config, 4 * USDC, 3 * USDC));

        _assertChannel(id, DEPOSIT, 3 * USDC);
        (uint128 claimed, uint128 settled) = batch.receivers(receiver, address(token));
        assertEq(claimed, 3 * USDC, "receiver claimed");
        assertEq(settled, 0, "nothing settled yet");
        assertEq(token.balanceOf(BATCH_ADDRESS), DEPOSIT, "claiming moves no tokens");
    }

    function test_claim_CountsOnlyTheIncrease() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        _claim(_voucherClaim(SESSION_PK, config, 3 * USDC, 3 * USDC));
        _claim(_voucherClaim(SESSION_PK, config, 8 * USDC, 7 * USDC));
        _assertChannel(id, DEPOSIT, 7 * USDC);
        (uint128 claimed,) = batch.receivers(receiver, address(token));
        assertEq(claimed, 7 * USDC, "receiver claimed the cumulative total once");
    }

    function test_claim_SkipsAnEntryThatClaimsNothingNew() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        bytes32 other = _deposit(_config("b"), DEPOSIT);
        _claim(_voucherClaim(SESSION_PK, config, 5 * USDC, 5 * USDC));

        IBatchSettlement.VoucherClaim[] memory both = new IBatchSettlement.VoucherClaim[](2);
        both[0] = _voucherClaim(SESSION_PK, config, 5 * USDC, 4 * USDC)[0];
        both[1] = _voucherClaim(SESSION_PK, _config("b"), 2 * USDC, 2 * USDC)[0];
        vm.expectEmit(BATCH_ADDRESS);
        emit IBatchSettlement.ClaimSkipped(id, _u128(4 * USDC), _u128(5 * USDC));
        _claim(both);

        _assertChannel(id, DEPOSIT, 5 * USDC);
        _assertChannel(other, DEPOSIT, 2 * USDC);
    }

    function test_claim_VoucherSignedByPayerWhenNoPayerAuthorizer() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        config.payerAuthorizer = address(0);
        bytes32 id = _deposit(config, DEPOSIT);
        _claim(_voucherClaim(ALICE_PK, config, 2 * USDC, 2 * USDC));
        _assertChannel(id, DEPOSIT, 2 * USDC);
    }

    function test_RevertWhen_ClaimNotByReceiverAuthorizer() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        IBatchSettlement.VoucherClaim[] memory claims = _voucherClaim(SESSION_PK, config, USDC, USDC);
        // Not even the receiver itself: only its authorizer claims.
        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.NotReceiverAuthorizer.selector, id, receiver));
        vm.prank(receiver);
        batch.claim(claims);
    }

    function test_RevertWhen_VoucherSignedBySomeoneElse() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        IBatchSettlement.VoucherClaim[] memory claims = _voucherClaim(BOB_PK, config, USDC, USDC);
        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.InvalidVoucherSignature.selector, id));
        _claim(claims);
        // With a payerAuthorizer set, the payer's own signature does not do either.
        claims = _voucherClaim(ALICE_PK, config, USDC, USDC);
        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.InvalidVoucherSignature.selector, id));
        _claim(claims);
    }

    function test_RevertWhen_ClaimAboveVoucher() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        IBatchSettlement.VoucherClaim[] memory claims = _voucherClaim(SESSION_PK, config, 2 * USDC, 3 * USDC);
        vm.expectRevert(
            abi.encodeWithSelector(IBatchSettlement.ClaimExceedsVoucher.selector, id, _u128(3 * USDC), _u128(2 * USDC))
        );
        _claim(claims);
    }

    function test_RevertWhen_ClaimAboveBalance() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        IBatchSettlement.VoucherClaim[] memory claims = _voucherClaim(SESSION_PK, config, DEPOSIT + 1, DEPOSIT + 1);
        vm.expectRevert(
            abi.encodeWithSelector(
                IBatchSettlement.ClaimExceedsBalance.selector, id, _u128(DEPOSIT + 1), _u128(DEPOSIT)
            )
        );
        _claim(claims);
    }

    function test_RevertWhen_ClaimBatchIsEmpty() public {
        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.EmptyClaimBatch.selector));
        _claim(new IBatchSettlement.VoucherClaim[](0));
    }

    function test_claimWithSignature_SubmittedByAnyone() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        IBatchSettlement.VoucherClaim[] memory claims = _voucherClaim(SESSION_PK, config, 3 * USDC, 3 * USDC);
        bytes memory signature = _sign(AUTHORIZER_PK, batch.getClaimBatchDigest(claims));
        vm.prank(stranger);
        batch.claimWithSignature(claims, signature);
        _assertChannel(id, DEPOSIT, 3 * USDC);
        // Replaying the signed batch changes nothing.
        vm.prank(stranger);
        batch.claimWithSignature(claims, signature);
        _assertChannel(id, DEPOSIT, 3 * USDC);
    }

    function test_RevertWhen_ClaimBatchSignedBySomeoneElse() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        _deposit(config, DEPOSIT);
        IBatchSettlement.VoucherClaim[] memory claims = _voucherClaim(SESSION_PK, config, 3 * USDC, 3 * USDC);
        bytes memory signature = _sign(BOB_PK, batch.getClaimBatchDigest(claims));
        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.InvalidAuthorizerSignature.selector, authorizer));
        batch.claimWithSignature(claims, signature);
    }

    function test_RevertWhen_ClaimBatchSignatureCoversOtherAmounts() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        _deposit(config, DEPOSIT);
        IBatchSettlement.VoucherClaim[] memory claims = _voucherClaim(SESSION_PK, config, 3 * USDC, 1 * USDC);
        bytes memory signature = _sign(AUTHORIZER_PK, batch.getClaimBatchDigest(claims));
        claims[0].totalClaimed = _u128(3 * USDC);
        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.InvalidAuthorizerSignature.selector, authorizer));
        batch.claimWithSignature(claims, signature);
    }

    // ---------------------------------------------------------------- settle

    function test_settle_PaysReceiverOnce() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        _deposit(config, DEPOSIT);
        _claim(_voucherClaim(SESSION_PK, config, 3 * USDC, 3 * USDC));

        vm.expectEmit(BATCH_ADDRESS);
        emit IBatchSettlement.Settled(receiver, address(token), stranger, _u128(3 * USDC));
        vm.prank(stranger);
        batch.settle(receiver, address(token));
        assertEq(token.balanceOf(receiver), 3 * USDC, "receiver paid");

        vm.prank(stranger);
        batch.settle(receiver, address(token));
        assertEq(token.balanceOf(receiver), 3 * USDC, "paid once");
        (uint128 claimed, uint128 settled) = batch.receivers(receiver, address(token));
        assertEq(claimed, settled, "everything claimed is settled");
    }

    function test_multicall_ClaimThenSettle() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        bytes[] memory calls = new bytes[](2);
        calls[0] = abi.encodeCall(BatchSettlement.claim, (_voucherClaim(SESSION_PK, config, 6 * USDC, 6 * USDC)));
        calls[1] = abi.encodeCall(BatchSettlement.settle, (receiver, address(token)));
        vm.prank(authorizer);
        batch.multicall(calls);
        _assertChannel(id, DEPOSIT, 6 * USDC);
        assertEq(token.balanceOf(receiver), 6 * USDC, "claimed and settled in one transaction");
        assertEq(token.balanceOf(BATCH_ADDRESS), DEPOSIT - 6 * USDC, "the rest stays in the channel");
    }

    // ---------------------------------------------------------------- withdrawal

    function test_withdraw_PaysAfterTheDelayWhatWasNotClaimed() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        vm.prank(alice);
        batch.initiateWithdraw(config, _u128(DEPOSIT));
        (uint128 pending, uint40 at) = batch.pendingWithdrawals(id);
        assertEq(pending, DEPOSIT, "pending amount");
        assertEq(at, block.timestamp, "initiated now");

        vm.warp(block.timestamp + DELAY - 1);
        vm.expectRevert(
            abi.encodeWithSelector(
                IBatchSettlement.WithdrawDelayNotElapsed.selector, id, block.timestamp + 1, block.timestamp
            )
        );
        vm.prank(alice);
        batch.finalizeWithdraw(config);

        // The receiver's window: it still claims during the delay, and keeps what it claimed.
        _claim(_voucherClaim(SESSION_PK, config, 10 * USDC, 10 * USDC));
        vm.warp(block.timestamp + 1);
        vm.expectEmit(BATCH_ADDRESS);
        emit IBatchSettlement.WithdrawFinalized(id, alice, _u128(DEPOSIT - 10 * USDC));
        vm.prank(alice);
        batch.finalizeWithdraw(config);

        assertEq(token.balanceOf(alice), DEPOSIT - 10 * USDC, "payer got the unclaimed rest");
        _assertChannel(id, 10 * USDC, 10 * USDC);
        (, at) = batch.pendingWithdrawals(id);
        assertEq(at, 0, "no withdrawal pending");
        batch.settle(receiver, address(token));
        assertEq(token.balanceOf(receiver), 10 * USDC, "receiver still paid");
    }

    function test_withdraw_PartialAmountByPayerAuthorizer() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        vm.prank(session);
        batch.initiateWithdraw(config, _u128(30 * USDC));
        vm.warp(block.timestamp + DELAY);
        vm.prank(session);
        batch.finalizeWithdraw(config);
        assertEq(token.balanceOf(alice), 30 * USDC, "paid to the payer, not the authorizer");
        _assertChannel(id, DEPOSIT - 30 * USDC, 0);
    }

    function test_RevertWhen_WithdrawByAnyoneElse() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.NotPayer.selector, id, authorizer));
        vm.prank(authorizer);
        batch.initiateWithdraw(config, _u128(DEPOSIT));
    }

    function test_RevertWhen_FinalizeWithoutPendingWithdrawal() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.NoPendingWithdrawal.selector, id));
        vm.prank(alice);
        batch.finalizeWithdraw(config);
    }

    // ---------------------------------------------------------------- refund

    function test_refund_PaysUnclaimedAndReducesPendingWithdrawal() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        _claim(_voucherClaim(SESSION_PK, config, 10 * USDC, 10 * USDC));
        vm.prank(alice);
        batch.initiateWithdraw(config, _u128(50 * USDC));
        uint256 initiatedAt = block.timestamp;

        vm.expectEmit(BATCH_ADDRESS);
        emit IBatchSettlement.Refunded(id, alice, _u128(20 * USDC), 0, _u128(30 * USDC));
        vm.prank(authorizer);
        batch.refund(config, _u128(20 * USDC));

        assertEq(token.balanceOf(alice), 20 * USDC, "refunded at once");
        _assertChannel(id, DEPOSIT - 20 * USDC, 10 * USDC);
        assertEq(batch.refundNonce(id), 1, "nonce used");
        (uint128 pending, uint40 at) = batch.pendingWithdrawals(id);
        assertEq(pending, 30 * USDC, "the withdrawal shrinks by the refund");
        assertEq(at, initiatedAt, "and keeps its clock");
    }

    function test_refund_CappedAtUnclaimedAndEndsTheWithdrawal() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        _claim(_voucherClaim(SESSION_PK, config, 10 * USDC, 10 * USDC));
        vm.prank(alice);
        batch.initiateWithdraw(config, _u128(DEPOSIT));

        vm.prank(authorizer);
        batch.refund(config, type(uint128).max);

        assertEq(token.balanceOf(alice), DEPOSIT - 10 * USDC, "everything unclaimed");
        _assertChannel(id, 10 * USDC, 10 * USDC);
        (, uint40 at) = batch.pendingWithdrawals(id);
        assertEq(at, 0, "nothing left to withdraw");

        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.NothingToRefund.selector, id));
        vm.prank(authorizer);
        batch.refund(config, _u128(USDC));
    }

    function test_RevertWhen_RefundNotByReceiverAuthorizer() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.NotReceiverAuthorizer.selector, id, alice));
        vm.prank(alice);
        batch.refund(config, _u128(USDC));
    }

    function test_refundWithSignature_OnceForItsNonce() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        bytes memory signature = _sign(AUTHORIZER_PK, batch.getRefundDigest(id, 0, _u128(15 * USDC)));
        vm.prank(stranger);
        batch.refundWithSignature(config, _u128(15 * USDC), 0, signature);
        assertEq(token.balanceOf(alice), 15 * USDC, "refunded");
        _assertChannel(id, DEPOSIT - 15 * USDC, 0);

        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.InvalidRefundNonce.selector, id, 1, 0));
        vm.prank(stranger);
        batch.refundWithSignature(config, _u128(15 * USDC), 0, signature);
    }

    function test_RevertWhen_RefundSignedBySomeoneElse() public {
        IBatchSettlement.ChannelConfig memory config = _config("a");
        bytes32 id = _deposit(config, DEPOSIT);
        bytes memory signature = _sign(ALICE_PK, batch.getRefundDigest(id, 0, _u128(DEPOSIT)));
        vm.expectRevert(abi.encodeWithSelector(IBatchSettlement.InvalidAuthorizerSignature.selector, authorizer));
        batch.refundWithSignature(config, _u128(DEPOSIT), 0, signature);
    }

    // ---------------------------------------------------------------- conservation

    /// @dev Whatever is claimed, withdrawn and refunded, the payer and the receiver end up with exactly the deposit.
    function testFuzz_MoneyIsConserved(uint256 deposited, uint256 claimed, uint256 refunded, uint256 withdrawn) public {
        deposited = bound(deposited, 1, 1e15);
        claimed = bound(claimed, 0, deposited);
        refunded = bound(refunded, 1, deposited);
        withdrawn = bound(withdrawn, 1, deposited);
        IBatchSettlement.ChannelConfig memory config = _config("fuzz");
        bytes32 id = _deposit(config, deposited);
        if (claimed != 0) _claim(_voucherClaim(SESSION_PK, config, claimed, claimed));
        vm.prank(alice);
        batch.initiateWithdraw(config, _u128(withdrawn));
        if (claimed < deposited) {
            vm.prank(authorizer);
            batch.refund(config, _u128(refunded));
        }
        (, uint40 at) = batch.pendingWithdrawals(id);
        if (at != 0) {
            vm.warp(block.timestamp + DELAY);
            vm.prank(alice);
            batch.finalizeWithdraw(config);
        }
        batch.settle(receiver, address(token));

        assertEq(token.balanceOf(receiver), claimed, "receiver got what was claimed");
        assertEq(token.balanceOf(alice) + token.balanceOf(receiver) + token.balanceOf(BATCH_ADDRESS), deposited, "sum");
        (uint128 balance, uint128 total) = batch.channels(id);
        assertEq(token.balanceOf(BATCH_ADDRESS), balance - total, "contract holds the unpaid channel balance");
    }
}
