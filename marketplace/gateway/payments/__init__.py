"""x402 payments: the wire format, and securing and settling the money for each request."""
