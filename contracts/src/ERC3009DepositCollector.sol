// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {IERC3009} from "@openzeppelin/contracts/interfaces/draft-IERC3009.sol";
import {IDepositCollector} from "./interfaces/IDepositCollector.sol";

/// @notice USDC (v2.2 and later) also takes the signature as bytes, which lets ERC-1271 wallets authorize.
interface IERC3009BytesSignature {
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;
}

/// @title Deposits into BatchSettlement paid with an ERC-3009 `receiveWithAuthorization`.
/// @notice The payer signs `ReceiveWithAuthorization(from = payer, to = this collector, value, validAfter,
/// validBefore, nonce)` with `nonce = keccak256(abi.encode(channelId, salt))`, so the authorization can only fund
/// that channel: the collector recomputes the nonce from the channel BatchSettlement names, and the token refuses
/// any other. `collectorData` is `abi.encode(uint256 validAfter, uint256 validBefore, uint256 salt, bytes
/// signature)`, as x402's `build_erc3009_collector_data` writes it.
/// @dev Only BatchSettlement may call `collect`; otherwise anyone holding a payer's authorization could pull the
/// money into this contract outside any channel. The only state is an immutable, so the runtime code can be copied
/// to x402's fixed address.
contract ERC3009DepositCollector is IDepositCollector {
    using SafeERC20 for IERC20;

    error ZeroAddress();
    error NotBatchSettlement(address caller);

    /// @notice The only contract allowed to collect, and where collected tokens go.
    address public immutable batchSettlement;

    constructor(address batchSettlement_) {
        if (batchSettlement_ == address(0)) revert ZeroAddress();
        batchSettlement = batchSettlement_;
    }

    /// @inheritdoc IDepositCollector
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external
    {
        if (msg.sender != batchSettlement) revert NotBatchSettlement(msg.sender);
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory signature) =
            abi.decode(collectorData, (uint256, uint256, uint256, bytes));
        bytes32 nonce = keccak256(abi.encode(channelId, salt));
        if (signature.length == 65) {
            // The (v, r, s) form is the one every ERC-3009 token has; a 65-byte signature is r, s, then v.
            (bytes32 r, bytes32 s) = abi.decode(signature, (bytes32, bytes32));
            IERC3009(token)
                .receiveWithAuthorization(
                    payer, address(this), amount, validAfter, validBefore, nonce, uint8(signature[64]), r, s
                );
        } else {
            IERC3009BytesSignature(token)
                .receiveWithAuthorization(payer, address(this), amount, validAfter, validBefore, nonce, signature);
        }
        IERC20(token).safeTransfer(msg.sender, amount);
    }
}
