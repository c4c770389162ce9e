// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Base} from "./Base.t.sol";
import {Merkle} from "./utils/Merkle.sol";
import {IVoucherEscrow} from "../src/interfaces/IVoucherEscrow.sol";

/// @notice The settlement path's transactions in their steady state (every slot already written once), one per test,
/// so that `forge snapshot --check` in `make test` catches any change in what they cost. Each test body is the one
/// call and the signing it needs; everything else happens in setUp, which the snapshot does not count.
contract GasSnapshotTest is Base {
    uint256 internal constant CHANNELS = 100;

    bytes32[] internal _ids;
    address[] internal _providers;
    uint256[] internal _amounts;

    function setUp() public override {
        super.setUp();
        for (uint256 i; i < CHANNELS; ++i) {
            // forge-lint: disable-next-line(unsafe-typecast) -- i < CHANNELS
            bytes32 channelId = _deposit(alice, uint96(i + 1), 100 * USDC);
            _redeem(_one(_redemption(ALICE_PK, channelId, USDC, USDC)));
            _ids.push(channelId);
        }
        (_providers, _amounts) = (new address[](4), new uint256[](4));
        (_providers[0], _providers[1], _providers[2], _providers[3]) = (providerA, providerB, providerC, treasury);
        (_amounts[0], _amounts[1], _amounts[2], _amounts[3]) = (10 * USDC, 20 * USDC, 30 * USDC, 1);
        _postLeaves();
        distributor.claim(providerA, _amounts[0], Merkle.proof(Merkle.leaves(_providers, _amounts), 0), _root());
        _stake(providerB, 10 * MIN_STAKE);
        _grow();
        _postLeaves();
    }

    function test_gas_redeemOneChannel() public {
        _redeem(_one(_redemption(ALICE_PK, _ids[0], 2 * USDC, 2 * USDC)));
    }

    function test_gas_redeemHundredChannels() public {
        IVoucherEscrow.Redemption[] memory batch = new IVoucherEscrow.Redemption[](CHANNELS);
        for (uint256 i; i < CHANNELS; ++i) {
            batch[i] = _redemption(ALICE_PK, _ids[i], 2 * USDC, 2 * USDC);
        }
        _redeem(batch);
    }

    function test_gas_postRoot() public {
        uint256 total = _amounts[0] + _amounts[1] + _amounts[2] + _amounts[3];
        uint256 epoch = distributor.epoch() + 1;
        vm.prank(operator);
        distributor.postRoot(epoch, keccak256("the next tree"), total);
    }

    function test_gas_claim() public {
        distributor.claim(providerA, _amounts[0], Merkle.proof(Merkle.leaves(_providers, _amounts), 0), _root());
    }

    function test_gas_slash() public {
        vm.prank(validator);
        stakeManager.slash(providerB, MIN_STAKE, keccak256("evidence"));
    }

    function _root() internal view returns (bytes32) {
        return Merkle.root(Merkle.leaves(_providers, _amounts));
    }

    function _postLeaves() internal {
        uint256 total = _amounts[0] + _amounts[1] + _amounts[2] + _amounts[3];
        uint256 epoch = distributor.epoch() + 1;
        bytes32 root = _root();
        vm.prank(operator);
        distributor.postRoot(epoch, root, total);
    }

    /// @dev Every leaf grows, so the next claim pays something.
    function _grow() internal {
        for (uint256 i; i < _amounts.length; ++i) {
            _amounts[i] += USDC;
        }
    }
}
