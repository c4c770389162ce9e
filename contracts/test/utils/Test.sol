// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Vm} from "./Vm.sol";
import {Bound} from "./Bound.sol";

/// @notice A minimal test base: cheatcodes, assertions that revert with the values they compared, `bound`, and
/// named addresses. Forge fails a test when it reverts, so every assertion is a revert with a custom error.
abstract contract Test {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

    /// @dev Older forge versions look for this flag to recognise a test contract; newer ones ignore it.
    bool public IS_TEST = true;

    error AssertEqUint(string what, uint256 left, uint256 right);
    error AssertEqAddress(string what, address left, address right);
    error AssertEqBytes32(string what, bytes32 left, bytes32 right);
    error AssertEqBool(string what, bool left, bool right);
    error AssertEqString(string what, string left, string right);
    error AssertLe(string what, uint256 left, uint256 right);
    error AssertGe(string what, uint256 left, uint256 right);
    error AssertFalse(string what);

    function assertEq(uint256 left, uint256 right, string memory what) internal pure {
        if (left != right) revert AssertEqUint(what, left, right);
    }

    function assertEq(address left, address right, string memory what) internal pure {
        if (left != right) revert AssertEqAddress(what, left, right);
    }

    function assertEq(bytes32 left, bytes32 right, string memory what) internal pure {
        if (left != right) revert AssertEqBytes32(what, left, right);
    }

    function assertEq(bool left, bool right, string memory what) internal pure {
        if (left != right) revert AssertEqBool(what, left, right);
    }

    function assertEq(string memory left, string memory right, string memory what) internal pure {
        if (keccak256(bytes(left)) != keccak256(bytes(right))) revert AssertEqString(what, left, right);
    }

    function assertLe(uint256 left, uint256 right, string memory what) internal pure {
        if (left > right) revert AssertLe(what, left, right);
    }

    function assertGe(uint256 left, uint256 right, string memory what) internal pure {
        if (left < right) revert AssertGe(what, left, right);
    }

    function assertTrue(bool condition, string memory what) internal pure {
        if (!condition) revert AssertFalse(what);
    }

    function bound(uint256 x, uint256 min, uint256 max) internal pure returns (uint256) {
        return Bound.bound(x, min, max);
    }

    function makeAddr(string memory name) internal returns (address account) {
        account = address(uint160(uint256(keccak256(bytes(name)))));
        vm.label(account, name);
    }
}

/// @notice The target lists forge reads from an invariant test (the names and types forge-std's StdInvariant uses).
abstract contract InvariantTest {
    struct FuzzSelector {
        address addr;
        bytes4[] selectors;
    }

    address[] private _targetedContracts;
    FuzzSelector[] private _targetedSelectors;

    function targetContract(address target) internal {
        _targetedContracts.push(target);
    }

    function targetSelector(FuzzSelector memory selector) internal {
        _targetedSelectors.push(selector);
    }

    function targetContracts() public view returns (address[] memory) {
        return _targetedContracts;
    }

    function targetSelectors() public view returns (FuzzSelector[] memory) {
        return _targetedSelectors;
    }
}
