// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Vm} from "../../utils/Vm.sol";
import {Bound} from "../../utils/Bound.sol";
import {Merkle} from "../../utils/Merkle.sol";
import {PaymentToken} from "../../../src/PaymentToken.sol";
import {VoucherEscrow} from "../../../src/VoucherEscrow.sol";
import {PayoutDistributor} from "../../../src/PayoutDistributor.sol";
import {IVoucherEscrow} from "../../../src/interfaces/IVoucherEscrow.sol";

/// @notice Drives the payment path the way the gateway does: payers fund channels and sign growing vouchers, the
/// operator redeems batches and posts Merkle roots, anyone claims for providers, payers exit. It keeps its own
/// model of every balance in ghost variables, and counts in `ghost_mismatches` every result the contracts returned
/// that the model did not expect, including a bad voucher or claim that went through.
///
/// An exit closes a channel for good. Each payer has SALTS open channel slots; when a channel in a slot closes, the
/// payer comes back the way the interface says it must, with a channel of a new salt in that slot, and the closed
/// channel is kept for `useClosedChannel` to try (and fail) to bring back to life. Besides redemptions, anyone may
/// fund the distributor with a plain transfer (`transferToDistributor`), which counts as funding too.
contract PaymentsHandler {
    using Bound for uint256;

    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));
    uint96 internal constant SALTS = 2;
    uint256 internal constant MAX_DEPOSIT = 1_000e6;

    PaymentToken internal immutable token;
    VoucherEscrow internal immutable escrow;
    PayoutDistributor internal immutable distributor;
    address internal immutable tokenOwner;
    address internal immutable operator;

    uint256[] internal _payerKeys;
    address[] internal _payers;
    address[] internal _providers;
    address[] internal _claimers;
    /// @dev The open channel slots: slot `i` belongs to payer `i / SALTS`.
    bytes32[] internal _channels;
    /// @dev Every channel ever used, open or closed, for the invariants.
    bytes32[] internal _allChannels;
    bytes32[] internal _closedChannels;
    mapping(bytes32 channelId => uint256) internal _payerIndexOf;
    /// @dev Salts below SALTS are the first channels; each reopening takes the next one.
    uint96 internal _nextSalt = SALTS;

    /// @dev Block time is kept here and set on every call, so it moves forward across a whole run.
    uint256 public currentTime;

    // Per channel.
    mapping(bytes32 channelId => uint256) public ghost_deposited;
    mapping(bytes32 channelId => uint256) public ghost_refunded;
    mapping(bytes32 channelId => uint256) public ghost_redeemed;
    mapping(bytes32 channelId => uint256) public ghost_maxVoucher;
    mapping(bytes32 channelId => bool) public ghost_closed;

    // Totals.
    uint256 public ghost_totalDeposited;
    uint256 public ghost_totalRefunded;
    uint256 public ghost_totalRedeemed;
    uint256 public ghost_totalClaimed;
    /// @dev Tokens sent straight to the distributor, past the escrow.
    uint256 public ghost_totalTransferredIn;
    /// @dev The distributor's funding (`funded()`) when the latest root was posted.
    uint256 public ghost_lastPostedFunded;
    uint256 public ghost_mismatches;

    // The latest posted tree.
    bytes32 public currentRoot;
    uint256[] internal _cumulative;
    mapping(address provider => uint256) public ghost_posted;

    constructor(
        PaymentToken token_,
        VoucherEscrow escrow_,
        PayoutDistributor distributor_,
        address tokenOwner_,
        address operator_,
        uint256[] memory payerKeys_,
        address[] memory providers_,
        address[] memory claimers_
    ) {
        token = token_;
        escrow = escrow_;
        distributor = distributor_;
        tokenOwner = tokenOwner_;
        operator = operator_;
        _providers = providers_;
        _claimers = claimers_;
        _cumulative = new uint256[](providers_.length);
        currentTime = block.timestamp;
        for (uint256 i; i < payerKeys_.length; ++i) {
            address payer = vm.addr(payerKeys_[i]);
            _payerKeys.push(payerKeys_[i]);
            _payers.push(payer);
            vm.prank(payer);
            token_.approve(address(escrow_), type(uint256).max);
            for (uint96 salt; salt < SALTS; ++salt) {
                bytes32 channelId = bytes32((uint256(uint160(payer)) << 96) | salt);
                _channels.push(channelId);
                _allChannels.push(channelId);
                _payerIndexOf[channelId] = i;
            }
        }
    }

    // ---------------------------------------------------------------- views for the invariant tests

    /// @notice Every channel ever used, the closed ones included.
    function channels() external view returns (bytes32[] memory) {
        return _allChannels;
    }

    function closedChannels() external view returns (bytes32[] memory) {
        return _closedChannels;
    }

    function payers() external view returns (address[] memory) {
        return _payers;
    }

    function providers() external view returns (address[] memory) {
        return _providers;
    }

    function claimers() external view returns (address[] memory) {
        return _claimers;
    }

    // ---------------------------------------------------------------- actions

    function warp(uint256 seconds_) external {
        currentTime += seconds_.bound(0, 3 days);
        vm.warp(currentTime);
    }

    /// @notice Any payer funds any channel (the money is the channel payer's either way).
    function deposit(uint256 channelSeed, uint256 funderSeed, uint256 amount) external {
        vm.warp(currentTime);
        bytes32 channelId = _channels[channelSeed % _channels.length];
        if (escrow.withdrawableAt(channelId) != 0) return;
        amount = amount.bound(1, MAX_DEPOSIT);
        address funder = _payers[funderSeed % _payers.length];
        if (token.balanceOf(funder) < amount) {
            vm.prank(tokenOwner);
            token.mint(funder, amount);
        }
        vm.prank(funder);
        // forge-lint: disable-next-line(unsafe-typecast) -- bounded by MAX_DEPOSIT
        escrow.deposit(channelId, uint128(amount));
        ghost_deposited[channelId] += amount;
        ghost_totalDeposited += amount;
    }

    /// @notice The operator redeems up to every open channel at once, each with a fresh, larger voucher. A voucher
    /// never promises more than was put into its channel. When no channel has anything left the batch is empty, which
    /// must move and log zero.
    function redeem(uint256 seed, uint256 count) external {
        vm.warp(currentTime);
        uint256 n = count.bound(1, _channels.length);
        IVoucherEscrow.Redemption[] memory batch = new IVoucherEscrow.Redemption[](n);
        uint256 k;
        uint256 expected;
        for (uint256 i; i < n; ++i) {
            uint256 idx = (seed % _channels.length + i) % _channels.length;
            bytes32 channelId = _channels[idx];
            IVoucherEscrow.Channel memory c = escrow.channel(channelId);
            if (c.deposit <= c.claimed) continue;
            uint256 r = uint256(keccak256(abi.encode(seed, i)));
            uint256 maxVoucher = r.bound(uint256(c.claimed) + 1, ghost_deposited[channelId]);
            uint256 claimTo = (r >> 128).bound(uint256(c.claimed) + 1, maxVoucher);
            batch[k++] = _signed(idx / SALTS, channelId, maxVoucher, claimTo);

            uint256 paid = (claimTo < c.deposit ? claimTo : c.deposit) - c.claimed;
            expected += paid;
            ghost_redeemed[channelId] += paid;
            if (maxVoucher > ghost_maxVoucher[channelId]) ghost_maxVoucher[channelId] = maxVoucher;
        }
        assembly ("memory-safe") {
            mstore(batch, k) // only the first k entries were filled
        }
        uint256 distributorBefore = token.balanceOf(address(distributor));
        uint256 redeemedBefore = escrow.totalRedeemed();
        vm.prank(operator);
        uint256 total = escrow.redeem(batch);
        if (total != expected) ++ghost_mismatches;
        if (token.balanceOf(address(distributor)) != distributorBefore + total) ++ghost_mismatches;
        if (escrow.totalRedeemed() != redeemedBefore + total) ++ghost_mismatches;
        ghost_totalRedeemed += total;
    }

    /// @notice The operator tries a voucher that must not pay: a replayed or lower one, one signed by another payer,
    /// or one whose claim exceeds its amount. It is skipped: the batch goes through and pays nothing.
    function redeemInvalid(uint256 channelSeed, uint256 mode, uint256 amount) external {
        vm.warp(currentTime);
        uint256 idx = channelSeed % _channels.length;
        bytes32 channelId = _channels[idx];
        IVoucherEscrow.Channel memory c = escrow.channel(channelId);
        IVoucherEscrow.Redemption[] memory batch = new IVoucherEscrow.Redemption[](1);
        mode %= 3;
        if (mode == 0) {
            if (c.claimed == 0) return;
            uint256 stale = amount.bound(1, c.claimed);
            batch[0] = _signed(idx / SALTS, channelId, stale, stale);
        } else if (mode == 1) {
            uint256 forged = amount.bound(uint256(c.claimed) + 1, uint256(c.claimed) + MAX_DEPOSIT);
            batch[0] = _signed((idx / SALTS + 1) % _payers.length, channelId, forged, forged);
        } else {
            uint256 voucher = amount.bound(uint256(c.claimed) + 1, uint256(c.claimed) + MAX_DEPOSIT);
            batch[0] = _signed(idx / SALTS, channelId, voucher, voucher);
            // forge-lint: disable-next-line(unsafe-typecast) -- claimed + MAX_DEPOSIT + 1 is far below 2**128
            batch[0].claimTo = uint128(voucher + 1);
        }
        uint256 redeemedBefore = escrow.totalRedeemed();
        vm.prank(operator);
        if (escrow.redeem(batch) != 0) ++ghost_mismatches;
        if (escrow.totalRedeemed() != redeemedBefore) ++ghost_mismatches;
    }

    function initiateWithdraw(uint256 channelSeed) external {
        vm.warp(currentTime);
        uint256 idx = channelSeed % _channels.length;
        bytes32 channelId = _channels[idx];
        if (escrow.withdrawableAt(channelId) != 0) return;
        vm.prank(_payers[idx / SALTS]);
        escrow.initiateWithdraw(channelId);
    }

    /// @notice Finalizes an exit, first waiting out the delay when needed. The channel closes for good; its payer
    /// comes back with a channel of a new salt in the same slot.
    function finalizeWithdraw(uint256 channelSeed) external {
        uint256 idx = channelSeed % _channels.length;
        bytes32 channelId = _channels[idx];
        uint256 exitAt = escrow.withdrawableAt(channelId);
        if (exitAt == 0) return;
        if (exitAt == escrow.CLOSED()) {
            ++ghost_mismatches; // a closed channel never stays in a slot
            return;
        }
        if (currentTime < exitAt) currentTime = exitAt;
        vm.warp(currentTime);
        IVoucherEscrow.Channel memory c = escrow.channel(channelId);
        address payer = _payers[idx / SALTS];
        uint256 before = token.balanceOf(payer);
        vm.prank(payer);
        uint256 amount = escrow.finalizeWithdraw(channelId);
        if (amount != c.deposit - c.claimed) ++ghost_mismatches;
        if (token.balanceOf(payer) != before + amount) ++ghost_mismatches;
        if (escrow.withdrawableAt(channelId) != escrow.CLOSED()) ++ghost_mismatches;
        ghost_refunded[channelId] += amount;
        ghost_totalRefunded += amount;
        ghost_closed[channelId] = true;
        _closedChannels.push(channelId);

        bytes32 reopened = bytes32((uint256(uint160(payer)) << 96) | _nextSalt++);
        _channels[idx] = reopened;
        _allChannels.push(reopened);
        _payerIndexOf[reopened] = idx / SALTS;
    }

    /// @notice Tries to use a closed channel again: a deposit (by its payer or anyone), a new exit, a second
    /// finalize, or a voucher of any amount. Each must revert with ChannelClosed, but the voucher, which must pay
    /// nothing, since a closed channel holds exactly what was claimed from it.
    function useClosedChannel(uint256 channelSeed, uint256 mode, uint256 amount) external {
        vm.warp(currentTime);
        if (_closedChannels.length == 0) return;
        bytes32 channelId = _closedChannels[channelSeed % _closedChannels.length];
        uint256 payerIndex = _payerIndexOf[channelId];
        address payer = _payers[payerIndex];
        bytes memory expected = abi.encodeWithSelector(IVoucherEscrow.ChannelClosed.selector, channelId);
        bool ok;
        bytes memory reason;
        mode %= 4;
        if (mode == 0) {
            amount = amount.bound(1, MAX_DEPOSIT);
            // The funder can pay, so only the closed channel can stop the deposit.
            address funder = _payers[(payerIndex + amount) % _payers.length];
            if (token.balanceOf(funder) < amount) {
                vm.prank(tokenOwner);
                token.mint(funder, amount);
            }
            vm.prank(funder);
            // forge-lint: disable-next-line(unsafe-typecast) -- bounded by MAX_DEPOSIT
            (ok, reason) = address(escrow).call(abi.encodeCall(escrow.deposit, (channelId, uint128(amount))));
        } else if (mode == 1) {
            vm.prank(payer);
            (ok, reason) = address(escrow).call(abi.encodeCall(escrow.initiateWithdraw, (channelId)));
        } else if (mode == 2) {
            vm.prank(payer);
            (ok, reason) = address(escrow).call(abi.encodeCall(escrow.finalizeWithdraw, (channelId)));
        } else {
            uint256 voucher = amount.bound(1, ghost_deposited[channelId] + MAX_DEPOSIT);
            IVoucherEscrow.Redemption[] memory batch = new IVoucherEscrow.Redemption[](1);
            batch[0] = _signed(payerIndex, channelId, voucher, voucher);
            vm.prank(operator);
            if (escrow.redeem(batch) != 0) ++ghost_mismatches;
            return;
        }
        if (ok || keccak256(reason) != keccak256(expected)) ++ghost_mismatches;
    }

    /// @notice Someone sends tokens straight to the distributor; the next root post counts them as funding.
    function transferToDistributor(uint256 senderSeed, uint256 amount) external {
        vm.warp(currentTime);
        amount = amount.bound(1, MAX_DEPOSIT);
        address sender = _payers[senderSeed % _payers.length];
        if (token.balanceOf(sender) < amount) {
            vm.prank(tokenOwner);
            token.mint(sender, amount);
        }
        uint256 fundedBefore = distributor.funded();
        vm.prank(sender);
        if (!token.transfer(address(distributor), amount)) ++ghost_mismatches;
        if (distributor.funded() != fundedBefore + amount) ++ghost_mismatches;
        ghost_totalTransferredIn += amount;
    }

    /// @notice The operator promises part of the unpromised pool to providers and posts the new tree.
    function postRoot(uint256 seed) external {
        vm.warp(currentTime);
        uint256 funded = distributor.funded();
        uint256 pool = distributor.providerPool(funded);
        uint256 previous = distributor.providerTotal();
        uint256 grant = seed.bound(0, pool - previous);
        uint256 left = grant;
        for (uint256 i; i < _providers.length; ++i) {
            uint256 part = i == _providers.length - 1 ? left : uint256(keccak256(abi.encode(seed, i))).bound(0, left);
            _cumulative[i] += part;
            left -= part;
        }
        bytes32 root = Merkle.root(Merkle.leaves(_providers, _cumulative));
        uint256 treasuryBefore = token.balanceOf(distributor.treasury());
        uint256 feesBefore = distributor.feesPaid();
        uint256 epoch = distributor.epoch() + 1;

        vm.prank(operator);
        distributor.postRoot(epoch, root, previous + grant);

        if (distributor.feesPaid() != funded - pool) ++ghost_mismatches;
        if (token.balanceOf(distributor.treasury()) != treasuryBefore + (funded - pool) - feesBefore) {
            ++ghost_mismatches;
        }
        if (distributor.funded() != funded) ++ghost_mismatches; // paying the fee leaves funding as it was
        currentRoot = root;
        ghost_lastPostedFunded = funded;
        for (uint256 i; i < _providers.length; ++i) {
            ghost_posted[_providers[i]] = _cumulative[i];
        }
    }

    /// @notice Anyone claims a provider's earnings against the current root.
    function claim(uint256 providerSeed, uint256 callerSeed) external {
        vm.warp(currentTime);
        if (currentRoot == bytes32(0)) return;
        uint256 i = providerSeed % _providers.length;
        address provider = _providers[i];
        uint256 already = distributor.claimed(provider);
        if (_cumulative[i] <= already) return;
        bytes32[] memory proof = Merkle.proof(Merkle.leaves(_providers, _cumulative), i);
        uint256 before = token.balanceOf(provider);

        vm.prank(_claimers[callerSeed % _claimers.length]);
        uint256 amount = distributor.claim(provider, _cumulative[i], proof, currentRoot);

        if (amount != _cumulative[i] - already) ++ghost_mismatches;
        if (token.balanceOf(provider) != before + amount) ++ghost_mismatches;
        ghost_totalClaimed += amount;
    }

    /// @notice A claim that must not pay: more than the leaf, or the leaf again.
    function claimInvalid(uint256 providerSeed, uint256 extra) external {
        vm.warp(currentTime);
        if (currentRoot == bytes32(0)) return;
        uint256 i = providerSeed % _providers.length;
        bytes32[] memory proof = Merkle.proof(Merkle.leaves(_providers, _cumulative), i);
        uint256 amount = _cumulative[i] + extra.bound(0, MAX_DEPOSIT);
        // With extra == 0 this is a valid leaf: it must pay nothing only when it was already claimed.
        if (amount == _cumulative[i] && distributor.claimed(_providers[i]) < amount) return;
        try distributor.claim(_providers[i], amount, proof, currentRoot) {
            ++ghost_mismatches;
        } catch {}
    }

    // ---------------------------------------------------------------- helpers

    /// @dev Amounts here are sums of bounded deposits, far below 2**128.
    function _signed(uint256 payerIndex, bytes32 channelId, uint256 maxVoucher, uint256 claimTo)
        internal
        view
        returns (IVoucherEscrow.Redemption memory)
    {
        // forge-lint: disable-next-line(unsafe-typecast)
        uint128 max = uint128(maxVoucher);
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(_payerKeys[payerIndex], escrow.voucherDigest(channelId, max));
        bytes32 vs = bytes32(uint256(s) | (uint256(v - 27) << 255));
        // forge-lint: disable-next-line(unsafe-typecast)
        return IVoucherEscrow.Redemption(channelId, max, uint128(claimTo), r, vs);
    }
}
