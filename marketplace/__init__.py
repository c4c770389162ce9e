"""The gateway: x402 payments, order book and routing, the coordinator, the client SDK and the CLI."""
