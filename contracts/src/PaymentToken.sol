// SPDX-License-Identifier: MIT
pragma solidity ^0.8.26;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";
import {ERC3009} from "@openzeppelin/contracts/token/ERC20/extensions/draft-ERC3009.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title Development stablecoin.
/// @notice Six decimals like USDC, with ERC-2612 permit and ERC-3009 transfer/receive with authorization (random
/// 32-byte nonces, as x402's `exact` scheme signs them). The owner mints; it is deployed only on development
/// networks, where it stands in for USDC. Both signature schemes share the EIP-712 domain {name, version "1"}.
contract PaymentToken is ERC20, ERC20Permit, ERC3009, Ownable {
    constructor(string memory name_, string memory symbol_, address owner_)
        ERC20(name_, symbol_)
        ERC20Permit(name_)
        Ownable(owner_)
    {}

    function decimals() public pure override returns (uint8) {
        return 6;
    }

    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
