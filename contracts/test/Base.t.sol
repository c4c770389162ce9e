// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {Test} from "./utils/Test.sol";
import {PaymentToken} from "../src/PaymentToken.sol";
import {StakeManager} from "../src/StakeManager.sol";
import {VoucherEscrow} from "../src/VoucherEscrow.sol";
import {PayoutDistributor} from "../src/PayoutDistributor.sol";
import {IVoucherEscrow} from "../src/interfaces/IVoucherEscrow.sol";

/// @notice Deploys the whole system the way production wires it: the escrow paying into the distributor (which knows
/// nothing of the escrow and counts whatever it holds as funding), the operator holding OPERATOR_ROLE on both, the
/// validator holding SLASHER_ROLE. Amounts are in 6-decimal base units.
abstract contract Base is Test {
    uint256 internal constant USDC = 1e6;
    uint256 internal constant MIN_STAKE = 100 * USDC;
    uint256 internal constant UNBONDING_PERIOD = 7 days;
    uint256 internal constant CHALLENGER_BPS = 2_500;
    uint256 internal constant WITHDRAW_DELAY = 1 days;
    uint256 internal constant START_TIME = 1_750_000_000;
    string internal constant TOKEN_NAME = "Strata Dev USD";
    string internal constant TOKEN_SYMBOL = "sUSD";

    PaymentToken internal token;
    StakeManager internal stakeManager;
    VoucherEscrow internal escrow;
    PayoutDistributor internal distributor;

    address internal admin;
    address internal operator;
    address internal validator;
    address internal treasury;
    address internal stranger;

    // Payers sign vouchers, so they are keys; providers only receive and stake.
    uint256 internal constant ALICE_PK = 0xA11CE;
    uint256 internal constant BOB_PK = 0xB0B;
    address internal alice;
    address internal bob;
    address internal providerA;
    address internal providerB;
    address internal providerC;

    function setUp() public virtual {
        vm.warp(START_TIME);
        admin = makeAddr("admin");
        operator = makeAddr("operator");
        validator = makeAddr("validator");
        treasury = makeAddr("treasury");
        stranger = makeAddr("stranger");
        alice = vm.addr(ALICE_PK);
        bob = vm.addr(BOB_PK);
        vm.label(alice, "alice");
        vm.label(bob, "bob");
        providerA = makeAddr("providerA");
        providerB = makeAddr("providerB");
        providerC = makeAddr("providerC");

        token = new PaymentToken(TOKEN_NAME, TOKEN_SYMBOL, admin);
        stakeManager = new StakeManager(token, treasury, admin, MIN_STAKE, UNBONDING_PERIOD, CHALLENGER_BPS);
        distributor = new PayoutDistributor(token, treasury, admin);
        escrow = new VoucherEscrow(token, address(distributor), admin, WITHDRAW_DELAY);
        vm.label(address(token), "PaymentToken");
        vm.label(address(stakeManager), "StakeManager");
        vm.label(address(distributor), "PayoutDistributor");
        vm.label(address(escrow), "VoucherEscrow");

        vm.startPrank(admin);
        escrow.grantRole(escrow.OPERATOR_ROLE(), operator);
        distributor.grantRole(distributor.OPERATOR_ROLE(), operator);
        stakeManager.grantRole(stakeManager.SLASHER_ROLE(), validator);
        vm.stopPrank();
    }

    // ---------------------------------------------------------------- token

    function _mint(address to, uint256 amount) internal {
        vm.prank(admin);
        token.mint(to, amount);
    }

    /// @dev Mints `amount` to `who` and approves `spender` for it.
    function _fund(address who, address spender, uint256 amount) internal {
        _mint(who, amount);
        vm.prank(who);
        token.approve(spender, type(uint256).max);
    }

    // ---------------------------------------------------------------- escrow

    function _channelId(address payer, uint96 salt) internal pure returns (bytes32) {
        return bytes32((uint256(uint160(payer)) << 96) | uint256(salt));
    }

    /// @dev Mints to `payer` and deposits into its channel `salt`.
    function _deposit(address payer, uint96 salt, uint256 amount) internal returns (bytes32 channelId) {
        channelId = _channelId(payer, salt);
        _fund(payer, address(escrow), amount);
        vm.prank(payer);
        escrow.deposit(channelId, _u128(amount));
    }

    /// @dev Signs `Voucher(channelId, maxClaimableAmount)` and returns it in EIP-2098 compact form.
    function _signVoucher(uint256 pk, bytes32 channelId, uint128 maxClaimableAmount)
        internal
        view
        returns (bytes32 r, bytes32 vs)
    {
        bytes32 s;
        uint8 v;
        (v, r, s) = vm.sign(pk, escrow.voucherDigest(channelId, maxClaimableAmount));
        vs = bytes32(uint256(s) | (uint256(v - 27) << 255));
    }

    /// @dev A signed batch entry. Amounts are taken as uint256 for convenience and must fit in 128 bits.
    function _redemption(uint256 pk, bytes32 channelId, uint256 maxClaimableAmount, uint256 claimTo)
        internal
        view
        returns (IVoucherEscrow.Redemption memory red)
    {
        (bytes32 r, bytes32 vs) = _signVoucher(pk, channelId, _u128(maxClaimableAmount));
        red = IVoucherEscrow.Redemption(channelId, _u128(maxClaimableAmount), _u128(claimTo), r, vs);
    }

    function _u128(uint256 x) internal pure returns (uint128) {
        if (x > type(uint128).max) revert AssertLe("uint128 test amount", x, type(uint128).max);
        // forge-lint: disable-next-line(unsafe-typecast) -- checked against type(uint128).max just above
        return uint128(x);
    }

    function _one(IVoucherEscrow.Redemption memory red)
        internal
        pure
        returns (IVoucherEscrow.Redemption[] memory batch)
    {
        batch = new IVoucherEscrow.Redemption[](1);
        batch[0] = red;
    }

    function _redeem(IVoucherEscrow.Redemption[] memory batch) internal returns (uint256) {
        vm.prank(operator);
        return escrow.redeem(batch);
    }

    /// @dev Deposits `deposited` into a fresh channel of alice and redeems `redeemed` of it, funding the distributor.
    function _fundDistributor(uint96 salt, uint256 deposited, uint256 redeemed) internal returns (bytes32 channelId) {
        channelId = _deposit(alice, salt, deposited);
        _redeem(_one(_redemption(ALICE_PK, channelId, redeemed, redeemed)));
    }

    // ---------------------------------------------------------------- stake

    function _stake(address provider, uint256 amount) internal {
        _fund(provider, address(stakeManager), amount);
        vm.prank(provider);
        stakeManager.stake(amount);
    }
}
