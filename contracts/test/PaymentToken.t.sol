// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Base} from "./Base.t.sol";
import {PaymentToken} from "../src/PaymentToken.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";
import {ERC3009} from "@openzeppelin/contracts/token/ERC20/extensions/draft-ERC3009.sol";
import {IERC3009, IERC3009Cancel} from "@openzeppelin/contracts/interfaces/draft-IERC3009.sol";

contract PaymentTokenTest is Base {
    bytes32 internal constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 internal constant PERMIT_TYPEHASH =
        keccak256("Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)");
    bytes32 internal constant TRANSFER_TYPEHASH = keccak256(
        "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );
    bytes32 internal constant RECEIVE_TYPEHASH = keccak256(
        "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );
    bytes32 internal constant CANCEL_TYPEHASH = keccak256("CancelAuthorization(address authorizer,bytes32 nonce)");
    uint256 internal constant BLOCK_RANGE_FLAG = 0x800000000000;

    bytes32 internal constant NONCE = keccak256("x402 nonce");

    /// @dev One ERC-3009 authorization, so tests can alter a single field.
    struct Auth {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }

    // ---------------------------------------------------------------- signing

    /// @dev Computed here from the constructor's name and version "1", not read from the token.
    function _domainSeparator() internal view returns (bytes32) {
        return keccak256(
            abi.encode(DOMAIN_TYPEHASH, keccak256(bytes(TOKEN_NAME)), keccak256("1"), block.chainid, address(token))
        );
    }

    function _digest(bytes32 structHash) internal view returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", _domainSeparator(), structHash));
    }

    function _authHash(bytes32 typehash, Auth memory a) internal view returns (bytes32) {
        return _digest(keccak256(abi.encode(typehash, a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce)));
    }

    function _auth(uint256 value) internal view returns (Auth memory) {
        return Auth(alice, bob, value, block.timestamp - 1, block.timestamp + 1 hours, NONCE);
    }

    function _transferWithAuthorization(Auth memory a, uint256 pk) internal {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(pk, _authHash(TRANSFER_TYPEHASH, a));
        token.transferWithAuthorization(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, v, r, s);
    }

    function _permitSig(uint256 pk, address owner, address spender, uint256 value, uint256 nonce, uint256 deadline)
        internal
        view
        returns (uint8 v, bytes32 r, bytes32 s)
    {
        return vm.sign(pk, _digest(keccak256(abi.encode(PERMIT_TYPEHASH, owner, spender, value, nonce, deadline))));
    }

    function _cancelSig(uint256 pk, address authorizer, bytes32 nonce)
        internal
        view
        returns (uint8 v, bytes32 r, bytes32 s)
    {
        return vm.sign(pk, _digest(keccak256(abi.encode(CANCEL_TYPEHASH, authorizer, nonce))));
    }

    // ---------------------------------------------------------------- metadata

    function test_constructor_SetsMetadataAndOwner() public view {
        assertEq(token.name(), TOKEN_NAME, "name");
        assertEq(token.symbol(), TOKEN_SYMBOL, "symbol");
        assertEq(token.owner(), admin, "owner");
        assertEq(token.totalSupply(), 0, "supply");
    }

    function test_decimals_IsSix() public view {
        assertEq(token.decimals(), 6, "decimals");
    }

    function test_DOMAIN_SEPARATOR_UsesConstructorNameAndVersionOne() public view {
        assertEq(token.DOMAIN_SEPARATOR(), _domainSeparator(), "domain separator");
    }

    function test_eip712Domain_ReportsNameAndVersionOne() public view {
        (, string memory name, string memory version, uint256 chainId, address verifying,,) = token.eip712Domain();
        assertEq(name, TOKEN_NAME, "name");
        assertEq(version, "1", "version");
        assertEq(chainId, block.chainid, "chain id");
        assertEq(verifying, address(token), "verifying contract");
    }

    // ---------------------------------------------------------------- mint and ownership

    function test_mint_CreditsRecipient() public {
        vm.expectEmit(address(token));
        emit IERC20.Transfer(address(0), alice, 5 * USDC);
        _mint(alice, 5 * USDC);
        assertEq(token.balanceOf(alice), 5 * USDC, "balance");
        assertEq(token.totalSupply(), 5 * USDC, "supply");
    }

    function test_RevertWhen_MintCallerIsNotOwner() public {
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, stranger));
        vm.prank(stranger);
        token.mint(stranger, 1);
    }

    function test_transferOwnership_HandsMintingToNewOwner() public {
        vm.prank(admin);
        token.transferOwnership(operator);
        assertEq(token.owner(), operator, "owner");

        vm.prank(operator);
        token.mint(bob, 7);
        assertEq(token.balanceOf(bob), 7, "minted by new owner");

        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, admin));
        vm.prank(admin);
        token.mint(admin, 1);
    }

    function test_RevertWhen_TransferOwnershipToZeroAddress() public {
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableInvalidOwner.selector, address(0)));
        vm.prank(admin);
        token.transferOwnership(address(0));
    }

    function test_RevertWhen_TransferOwnershipCallerIsNotOwner() public {
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, stranger));
        vm.prank(stranger);
        token.transferOwnership(stranger);
    }

    function test_renounceOwnership_EndsMinting() public {
        vm.prank(admin);
        token.renounceOwnership();
        assertEq(token.owner(), address(0), "owner");

        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, admin));
        vm.prank(admin);
        token.mint(admin, 1);
    }

    // ---------------------------------------------------------------- ERC-20

    function test_transfer_MovesBalance() public {
        _mint(alice, 10);
        vm.expectEmit(address(token));
        emit IERC20.Transfer(alice, bob, 4);
        vm.prank(alice);
        assertTrue(token.transfer(bob, 4), "returns true");
        assertEq(token.balanceOf(alice), 6, "sender");
        assertEq(token.balanceOf(bob), 4, "recipient");
    }

    function test_RevertWhen_TransferExceedsBalance() public {
        _mint(alice, 10);
        vm.expectRevert(abi.encodeWithSelector(IERC20Errors.ERC20InsufficientBalance.selector, alice, 10, 11));
        vm.prank(alice);
        // forge-lint: disable-next-line(erc20-unchecked-transfer) -- it reverts
        token.transfer(bob, 11);
    }

    function test_transferFrom_SpendsAllowance() public {
        _mint(alice, 10);
        vm.prank(alice);
        token.approve(stranger, 6);
        vm.prank(stranger);
        assertTrue(token.transferFrom(alice, bob, 4), "returns true");
        assertEq(token.allowance(alice, stranger), 2, "allowance left");
        assertEq(token.balanceOf(bob), 4, "recipient");
    }

    function test_RevertWhen_TransferFromExceedsAllowance() public {
        _mint(alice, 10);
        vm.prank(alice);
        token.approve(stranger, 3);
        vm.expectRevert(abi.encodeWithSelector(IERC20Errors.ERC20InsufficientAllowance.selector, stranger, 3, 4));
        vm.prank(stranger);
        // forge-lint: disable-next-line(erc20-unchecked-transfer) -- it reverts
        token.transferFrom(alice, bob, 4);
    }

    function test_RevertWhen_ApproveZeroSpender() public {
        vm.expectRevert(abi.encodeWithSelector(IERC20Errors.ERC20InvalidSpender.selector, address(0)));
        vm.prank(alice);
        token.approve(address(0), 1);
    }

    // ---------------------------------------------------------------- ERC-2612 permit

    function test_permit_SetsAllowanceAndUsesNonce() public {
        uint256 deadline = block.timestamp + 1 hours;
        (uint8 v, bytes32 r, bytes32 s) = _permitSig(ALICE_PK, alice, bob, 123, 0, deadline);

        vm.expectEmit(address(token));
        emit IERC20.Approval(alice, bob, 123);
        vm.prank(stranger);
        token.permit(alice, bob, 123, deadline, v, r, s);

        assertEq(token.allowance(alice, bob), 123, "allowance");
        assertEq(token.nonces(alice), 1, "nonce");
    }

    function test_permit_AcceptsDeadlineEqualToNow() public {
        uint256 deadline = block.timestamp;
        (uint8 v, bytes32 r, bytes32 s) = _permitSig(ALICE_PK, alice, bob, 1, 0, deadline);
        token.permit(alice, bob, 1, deadline, v, r, s);
        assertEq(token.allowance(alice, bob), 1, "allowance");
    }

    function test_RevertWhen_PermitExpired() public {
        uint256 deadline = block.timestamp - 1;
        (uint8 v, bytes32 r, bytes32 s) = _permitSig(ALICE_PK, alice, bob, 1, 0, deadline);
        vm.expectRevert(abi.encodeWithSelector(ERC20Permit.ERC2612ExpiredSignature.selector, deadline));
        token.permit(alice, bob, 1, deadline, v, r, s);
    }

    function test_RevertWhen_PermitSignedByAnotherKey() public {
        uint256 deadline = block.timestamp + 1 hours;
        (uint8 v, bytes32 r, bytes32 s) = _permitSig(BOB_PK, alice, bob, 1, 0, deadline);
        vm.expectRevert(abi.encodeWithSelector(ERC20Permit.ERC2612InvalidSigner.selector, bob, alice));
        token.permit(alice, bob, 1, deadline, v, r, s);
    }

    function test_RevertWhen_PermitReplayed() public {
        uint256 deadline = block.timestamp + 1 hours;
        (uint8 v, bytes32 r, bytes32 s) = _permitSig(ALICE_PK, alice, bob, 1, 0, deadline);
        token.permit(alice, bob, 1, deadline, v, r, s);

        // The replay is checked against nonce 1, so the same signature recovers some other address.
        bytes32 replayDigest = _digest(keccak256(abi.encode(PERMIT_TYPEHASH, alice, bob, 1, 1, deadline)));
        address recovered = ecrecover(replayDigest, v, r, s);
        vm.expectRevert(abi.encodeWithSelector(ERC20Permit.ERC2612InvalidSigner.selector, recovered, alice));
        token.permit(alice, bob, 1, deadline, v, r, s);
    }

    // ---------------------------------------------------------------- ERC-3009 transferWithAuthorization

    function test_transferWithAuthorization_MovesValue() public {
        _mint(alice, 10 * USDC);
        Auth memory a = _auth(4 * USDC);

        vm.expectEmit(address(token));
        emit IERC3009.AuthorizationUsed(alice, NONCE);
        vm.expectEmit(address(token));
        emit IERC20.Transfer(alice, bob, 4 * USDC);
        // Anyone may relay the authorization: the facilitator pays the gas.
        vm.prank(stranger);
        _transferWithAuthorization(a, ALICE_PK);

        assertEq(token.balanceOf(alice), 6 * USDC, "payer");
        assertEq(token.balanceOf(bob), 4 * USDC, "payee");
        assertTrue(token.authorizationState(alice, NONCE), "nonce used");
    }

    function test_RevertWhen_TransferWithAuthorizationNonceReused() public {
        _mint(alice, 10 * USDC);
        Auth memory a = _auth(1 * USDC);
        _transferWithAuthorization(a, ALICE_PK);

        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, alice, NONCE));
        _transferWithAuthorization(a, ALICE_PK);
    }

    function test_RevertWhen_TransferWithAuthorizationNonceReusedForOtherValue() public {
        _mint(alice, 10 * USDC);
        _transferWithAuthorization(_auth(1 * USDC), ALICE_PK);

        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, alice, NONCE));
        _transferWithAuthorization(_auth(2 * USDC), ALICE_PK);
    }

    function test_RevertWhen_TransferWithAuthorizationNotYetValid() public {
        _mint(alice, 10 * USDC);
        Auth memory a = _auth(1 * USDC);
        a.validAfter = block.timestamp; // valid strictly after validAfter
        vm.expectRevert(
            abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, a.validAfter, a.validBefore)
        );
        _transferWithAuthorization(a, ALICE_PK);
    }

    function test_RevertWhen_TransferWithAuthorizationExpired() public {
        _mint(alice, 10 * USDC);
        Auth memory a = _auth(1 * USDC);
        vm.warp(a.validBefore); // valid strictly before validBefore
        vm.expectRevert(
            abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, a.validAfter, a.validBefore)
        );
        _transferWithAuthorization(a, ALICE_PK);
    }

    function test_transferWithAuthorization_ValidOneSecondInsideEitherEnd() public {
        _mint(alice, 10 * USDC);
        Auth memory a = _auth(1 * USDC);
        a.validAfter = block.timestamp - 1;
        a.validBefore = block.timestamp + 1;
        _transferWithAuthorization(a, ALICE_PK);
        assertEq(token.balanceOf(bob), 1 * USDC, "payee");
    }

    function test_transferWithAuthorization_BlockNumberWindow() public {
        _mint(alice, 10 * USDC);
        vm.roll(100);
        // Both bounds carrying bit 47 select the block-number clock.
        Auth memory a = _auth(1 * USDC);
        a.validAfter = BLOCK_RANGE_FLAG | 99;
        a.validBefore = BLOCK_RANGE_FLAG | 101;
        _transferWithAuthorization(a, ALICE_PK);
        assertEq(token.balanceOf(bob), 1 * USDC, "payee");

        a.nonce = keccak256("second");
        vm.roll(101);
        vm.expectRevert(
            abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, a.validAfter, a.validBefore)
        );
        _transferWithAuthorization(a, ALICE_PK);
    }

    function test_RevertWhen_TransferWithAuthorizationSignedByAnotherKey() public {
        _mint(alice, 10 * USDC);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009InvalidSignature.selector));
        _transferWithAuthorization(_auth(1 * USDC), BOB_PK);
    }

    function test_RevertWhen_TransferWithAuthorizationValueAltered() public {
        _mint(alice, 10 * USDC);
        Auth memory a = _auth(1 * USDC);
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(ALICE_PK, _authHash(TRANSFER_TYPEHASH, a));
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009InvalidSignature.selector));
        token.transferWithAuthorization(a.from, a.to, 2 * USDC, a.validAfter, a.validBefore, a.nonce, v, r, s);
    }

    function test_RevertWhen_TransferWithAuthorizationExceedsBalance() public {
        _mint(alice, 1 * USDC);
        vm.expectRevert(
            abi.encodeWithSelector(IERC20Errors.ERC20InsufficientBalance.selector, alice, 1 * USDC, 2 * USDC)
        );
        _transferWithAuthorization(_auth(2 * USDC), ALICE_PK);
    }

    // ---------------------------------------------------------------- ERC-3009 receiveWithAuthorization

    function _receiveWithAuthorization(Auth memory a, bytes32 typehash) internal {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(ALICE_PK, _authHash(typehash, a));
        token.receiveWithAuthorization(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, v, r, s);
    }

    function test_receiveWithAuthorization_MovesValueToCaller() public {
        _mint(alice, 10 * USDC);
        vm.expectEmit(address(token));
        emit IERC3009.AuthorizationUsed(alice, NONCE);
        vm.prank(bob);
        _receiveWithAuthorization(_auth(3 * USDC), RECEIVE_TYPEHASH);
        assertEq(token.balanceOf(bob), 3 * USDC, "payee");
        assertTrue(token.authorizationState(alice, NONCE), "nonce used");
    }

    function test_RevertWhen_ReceiveWithAuthorizationCallerIsNotPayee() public {
        _mint(alice, 10 * USDC);
        vm.expectRevert(abi.encodeWithSelector(IERC20Errors.ERC20InvalidReceiver.selector, bob));
        vm.prank(stranger);
        _receiveWithAuthorization(_auth(3 * USDC), RECEIVE_TYPEHASH);
    }

    function test_RevertWhen_ReceiveWithAuthorizationGivenTransferSignature() public {
        _mint(alice, 10 * USDC);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009InvalidSignature.selector));
        vm.prank(bob);
        _receiveWithAuthorization(_auth(3 * USDC), TRANSFER_TYPEHASH);
    }

    function test_RevertWhen_ReceiveWithAuthorizationNonceUsedByTransfer() public {
        _mint(alice, 10 * USDC);
        _transferWithAuthorization(_auth(1 * USDC), ALICE_PK);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, alice, NONCE));
        vm.prank(bob);
        _receiveWithAuthorization(_auth(1 * USDC), RECEIVE_TYPEHASH);
    }

    function test_RevertWhen_ReceiveWithAuthorizationExpired() public {
        _mint(alice, 10 * USDC);
        Auth memory a = _auth(1 * USDC);
        vm.warp(a.validBefore + 1);
        vm.expectRevert(
            abi.encodeWithSelector(ERC3009.ERC3009InvalidAuthorizationTime.selector, a.validAfter, a.validBefore)
        );
        vm.prank(bob);
        _receiveWithAuthorization(a, RECEIVE_TYPEHASH);
    }

    // ---------------------------------------------------------------- ERC-3009 cancelAuthorization

    function test_cancelAuthorization_BurnsNonce() public {
        _mint(alice, 10 * USDC);
        (uint8 v, bytes32 r, bytes32 s) = _cancelSig(ALICE_PK, alice, NONCE);
        vm.expectEmit(address(token));
        emit IERC3009Cancel.AuthorizationCanceled(alice, NONCE);
        vm.prank(stranger);
        token.cancelAuthorization(alice, NONCE, v, r, s);
        assertTrue(token.authorizationState(alice, NONCE), "nonce burnt");

        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, alice, NONCE));
        _transferWithAuthorization(_auth(1 * USDC), ALICE_PK);
        assertEq(token.balanceOf(alice), 10 * USDC, "nothing moved");
    }

    function test_RevertWhen_CancelAuthorizationSignedByAnotherKey() public {
        (uint8 v, bytes32 r, bytes32 s) = _cancelSig(BOB_PK, alice, NONCE);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009InvalidSignature.selector));
        token.cancelAuthorization(alice, NONCE, v, r, s);
    }

    function test_RevertWhen_CancelAuthorizationNonceAlreadyUsed() public {
        _mint(alice, 10 * USDC);
        _transferWithAuthorization(_auth(1 * USDC), ALICE_PK);
        (uint8 v, bytes32 r, bytes32 s) = _cancelSig(ALICE_PK, alice, NONCE);
        vm.expectRevert(abi.encodeWithSelector(ERC3009.ERC3009UsedAuthorization.selector, alice, NONCE));
        token.cancelAuthorization(alice, NONCE, v, r, s);
    }

    // ---------------------------------------------------------------- fuzz

    function testFuzz_transferWithAuthorization_MovesExactValue(
        uint256 balance,
        uint256 value,
        bytes32 nonce,
        uint256 lead,
        uint256 lifetime
    ) public {
        balance = bound(balance, 1, type(uint128).max);
        value = bound(value, 0, balance);
        lead = bound(lead, 1, 365 days);
        lifetime = bound(lifetime, 1, 365 days);
        _mint(alice, balance);
        Auth memory a = Auth(alice, bob, value, block.timestamp - lead, block.timestamp + lifetime, nonce);

        _transferWithAuthorization(a, ALICE_PK);

        assertEq(token.balanceOf(alice), balance - value, "payer");
        assertEq(token.balanceOf(bob), value, "payee");
        assertTrue(token.authorizationState(alice, nonce), "nonce used");
        assertEq(token.authorizationState(bob, nonce), false, "nonces are per authorizer");
    }

    function testFuzz_permit_SetsAllowance(uint256 value, uint256 deadline) public {
        deadline = bound(deadline, block.timestamp, type(uint64).max);
        (uint8 v, bytes32 r, bytes32 s) = _permitSig(ALICE_PK, alice, bob, value, 0, deadline);
        token.permit(alice, bob, value, deadline, v, r, s);
        assertEq(token.allowance(alice, bob), value, "allowance");
        assertEq(token.nonces(alice), 1, "nonce");
    }
}
