"""The money and the chain: contracts, EIP-712 types, Merkle payouts, deployment."""
