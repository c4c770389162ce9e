// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Vm} from "../../utils/Vm.sol";
import {Bound} from "../../utils/Bound.sol";
import {Merkle} from "../../utils/Merkle.sol";
import {PaymentToken} from "../../../src/PaymentToken.sol";
import {VoucherEscrow} from "../../../src/VoucherEscrow.sol";
import {PayoutDistributor} from "../../../src/PayoutDistributor.sol";
import {IVoucherEscrow} from "../../../src/interfaces/IVoucherEscrow.sol";

/// @notice The epoch closer against payers who leave at any moment. Payers fund channels and are charged (each charge
/// raises the voucher the operator holds for the channel); any payer may start an exit and finalize it as soon as the
/// delay allows, which includes the moment between the operator reading the chain and its batch landing, since the
/// operator here never looks. `settle` is the closer: it redeems every channel it believes owes something, closed ones
/// included, in batches of any size, then posts a root for exactly what the chain now holds. Nothing in `settle` or
/// `claim` is allowed to revert (the invariant test runs with fail_on_revert), so no order of payer actions can leave
/// an epoch that cannot be settled.
contract LivenessHandler {
    using Bound for uint256;

    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));
    uint256 internal constant MAX_DEPOSIT = 1_000e6;

    PaymentToken internal immutable token;
    VoucherEscrow internal immutable escrow;
    PayoutDistributor internal immutable distributor;
    address internal immutable tokenOwner;
    address internal immutable operator;
    address internal immutable provider;

    uint256[] internal _payerKeys;
    /// @dev Each payer's current channel; a closed one is replaced by a channel of the next salt.
    bytes32[] internal _current;
    /// @dev Every channel ever used, for the operator, which settles closed ones too: it cannot know in time.
    bytes32[] internal _all;
    mapping(bytes32 channelId => uint256 payerIndex) internal _payerOf;
    uint96 internal _nextSalt = 1;
    uint256 public currentTime;

    mapping(bytes32 channelId => uint256) public ghost_charged;
    /// @dev Charges a payer's exit took back before the operator collected them: lost, and only those.
    uint256 public ghost_escaped;
    uint256 public ghost_settles;
    uint256 public ghost_mismatches;
    uint256 public ghost_posted;
    bytes32 internal _root;
    bytes32 internal _previousRoot;
    uint256 internal _previousPosted;

    constructor(
        PaymentToken token_,
        VoucherEscrow escrow_,
        PayoutDistributor distributor_,
        address tokenOwner_,
        address operator_,
        address provider_,
        uint256[] memory payerKeys_
    ) {
        (token, escrow, distributor) = (token_, escrow_, distributor_);
        (tokenOwner, operator, provider) = (tokenOwner_, operator_, provider_);
        currentTime = block.timestamp;
        for (uint256 i; i < payerKeys_.length; ++i) {
            _payerKeys.push(payerKeys_[i]);
            vm.prank(vm.addr(payerKeys_[i]));
            token_.approve(address(escrow_), type(uint256).max);
            _current.push(_open(i));
        }
    }

    function channels() external view returns (bytes32[] memory) {
        return _all;
    }

    // ---------------------------------------------------------------- payers

    function warp(uint256 seconds_) external {
        currentTime += seconds_.bound(0, 2 days);
        vm.warp(currentTime);
    }

    function fund(uint256 payerSeed, uint256 amount) external {
        vm.warp(currentTime);
        uint256 p = payerSeed % _current.length;
        bytes32 channelId = _current[p];
        if (escrow.withdrawableAt(channelId) != 0) return;
        amount = amount.bound(1, MAX_DEPOSIT);
        address payer = vm.addr(_payerKeys[p]);
        vm.prank(tokenOwner);
        token.mint(payer, amount);
        vm.prank(payer);
        // forge-lint: disable-next-line(unsafe-typecast) -- bounded by MAX_DEPOSIT
        escrow.deposit(channelId, uint128(amount));
    }

    /// @notice A request served and charged: allowed while the channel is open or exiting and covers it.
    function charge(uint256 payerSeed, uint256 amount) external {
        vm.warp(currentTime);
        bytes32 channelId = _current[payerSeed % _current.length];
        uint256 deposited = escrow.channel(channelId).deposit;
        if (ghost_charged[channelId] >= deposited) return;
        ghost_charged[channelId] += amount.bound(1, deposited - ghost_charged[channelId]);
    }

    function startExit(uint256 payerSeed) external {
        vm.warp(currentTime);
        uint256 p = payerSeed % _current.length;
        bytes32 channelId = _current[p];
        if (escrow.withdrawableAt(channelId) != 0) return;
        vm.prank(vm.addr(_payerKeys[p]));
        escrow.initiateWithdraw(channelId);
    }

    /// @notice Finalizes an exit the moment it may be, whatever the operator has or has not collected.
    function finalizeExit(uint256 payerSeed) external {
        uint256 p = payerSeed % _current.length;
        bytes32 channelId = _current[p];
        uint256 exitAt = escrow.withdrawableAt(channelId);
        if (exitAt == 0) return;
        if (currentTime < exitAt) currentTime = exitAt;
        vm.warp(currentTime);
        IVoucherEscrow.Channel memory c = escrow.channel(channelId);
        vm.prank(vm.addr(_payerKeys[p]));
        escrow.finalizeWithdraw(channelId);
        ghost_escaped += ghost_charged[channelId] - c.claimed;
        _current[p] = _open(p);
    }

    // ---------------------------------------------------------------- the operator

    /// @notice Closes an epoch: redeems every channel charged beyond what it gave, in batches of `batchSize`, then
    /// posts the provider's cumulative leaf at the whole pool of what the distributor now holds.
    function settle(uint256 batchSize) external {
        vm.warp(currentTime);
        batchSize = batchSize.bound(1, 8);
        bytes32[] memory due = new bytes32[](_all.length);
        uint256 n;
        for (uint256 i; i < _all.length; ++i) {
            if (ghost_charged[_all[i]] > escrow.channel(_all[i]).claimed) due[n++] = _all[i];
        }
        for (uint256 start; start < n; start += batchSize) {
            uint256 size = n - start < batchSize ? n - start : batchSize;
            IVoucherEscrow.Redemption[] memory batch = new IVoucherEscrow.Redemption[](size);
            for (uint256 k; k < size; ++k) {
                batch[k] = _voucher(due[start + k]);
            }
            vm.prank(operator);
            escrow.redeem(batch);
        }
        // Every channel that has not been closed gave all it was charged; a closed one gave what it had.
        for (uint256 i; i < _all.length; ++i) {
            bytes32 channelId = _all[i];
            uint256 claimed = escrow.channel(channelId).claimed;
            bool closed = escrow.withdrawableAt(channelId) == escrow.CLOSED();
            if (!closed && claimed != ghost_charged[channelId]) ++ghost_mismatches;
        }

        uint256 pool = distributor.providerPool(distributor.funded());
        bytes32 root = Merkle.leaf(provider, pool);
        uint256 epoch = distributor.epoch() + 1;
        vm.prank(operator);
        distributor.postRoot(epoch, root, pool);
        (_previousRoot, _previousPosted) = (_root, ghost_posted);
        (_root, ghost_posted) = (root, pool);
        ++ghost_settles;
    }

    /// @notice The provider claims its leaf, against the current root or, sent before the latest post, the previous
    /// one while its grace lasts.
    function claim(bool againstPrevious) external {
        vm.warp(currentTime);
        bool previous =
            againstPrevious && _previousRoot != bytes32(0) && block.timestamp < distributor.previousRootValidUntil();
        (bytes32 root, uint256 amount) = previous ? (_previousRoot, _previousPosted) : (_root, ghost_posted);
        if (root == bytes32(0) || amount <= distributor.claimed(provider)) return;
        distributor.claim(provider, amount, new bytes32[](0), root);
    }

    // ---------------------------------------------------------------- helpers

    function _open(uint256 payerIndex) internal returns (bytes32 channelId) {
        channelId = bytes32((uint256(uint160(vm.addr(_payerKeys[payerIndex]))) << 96) | _nextSalt++);
        _all.push(channelId);
        _payerOf[channelId] = payerIndex;
    }

    function _voucher(bytes32 channelId) internal view returns (IVoucherEscrow.Redemption memory) {
        // forge-lint: disable-next-line(unsafe-typecast) -- sums of bounded deposits, far below 2**128
        uint128 amount = uint128(ghost_charged[channelId]);
        (uint8 v, bytes32 r, bytes32 s) =
            vm.sign(_payerKeys[_payerOf[channelId]], escrow.voucherDigest(channelId, amount));
        return IVoucherEscrow.Redemption(channelId, amount, amount, r, bytes32(uint256(s) | (uint256(v - 27) << 255)));
    }
}
