"""The gateway: the OpenAI-compatible HTTP API paid over x402, the order book and routing, the coordinator that
drives a job across providers, and the chain state it decides with (``uvicorn marketplace.gateway.api:app``)."""
