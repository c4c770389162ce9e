"""The client SDK: pays a Strata gateway's 402s with vouchers on a payment channel, automatically.

    wallet = ChannelWallet(account, channel_id, escrow=ESCROW, chain_id=31337)
    async with StrataClient("http://127.0.0.1:8000", wallet) as strata:
        answer = await strata.chat("tiny", [{"role": "user", "content": "hello"}], max_tokens=16)

or hand OpenAI's client an HTTP client that pays:

    openai = AsyncOpenAI(base_url=".../v1", api_key="unused", http_client=strata.http)

How a voucher's amount is chosen. A channel's vouchers are cumulative: each one promises the channel's total so
far, and the gateway takes one only if it is above the newest it accepted and covers everything charged or
reserved on the channel plus the new quote. The wallet signs exactly

    max(newest signed + 1, charged + unsettled + quotes in flight + this quote)

where ``charged`` is the channel's cumulative charge as the gateway acknowledged it in a ``PAYMENT-RESPONSE``
(or the ``payment`` field of a stream's last chunk), never above the newest voucher signed, and ``unsettled``
counts, at their full quote, requests that ended without saying what they cost. Because charges are metered and
often below the quote, this keeps the signed total close to what was really spent, not to the sum of quotes.

What the wallet will not sign. A quote above ``max_per_request`` (base units; 5 tokens unless the wallet is given
another) is refused before anything is signed. A gateway's refusal may name a ``minimum``; the wallet re-signs
once, at the amount above, and refuses a minimum above it: a gateway's error body never raises what the wallet
promises (:class:`SpendingCapExceeded`, codes ``quote_above_cap`` and ``minimum_above_cap``). The one figure
taken on the gateway's word is a fresh wallet's first read of its channel (``GET /v1/channels/{id}``), the only
way to learn what earlier processes signed on it.

Concurrent requests. Signing and sending are serialised on the wallet's lock, held from signing a voucher until
the gateway has taken it (the response headers, or the channel read showing it), so vouchers arrive in the
order they were signed; the jobs themselves run concurrently. Use one wallet per channel per process.

Deposits: a voucher above the channel's deposit is refused. Given ``fund`` (an on-chain deposit, see
:func:`fund_channel`) and ``top_up``, the wallet deposits ``top_up`` more whenever a voucher would exceed the
deposit it knows; without them it raises :class:`InsufficientDeposit` before sending anything.
"""

from marketplace.client.http import PayingTransport, StrataClient, stream_chunks
from marketplace.client.wallet import (
    DEFAULT_MAX_PER_REQUEST,
    ChannelWallet,
    InsufficientDeposit,
    PaymentFailed,
    SpendingCapExceeded,
    fund_channel,
)

__all__ = [
    "DEFAULT_MAX_PER_REQUEST",
    "ChannelWallet",
    "InsufficientDeposit",
    "PayingTransport",
    "PaymentFailed",
    "SpendingCapExceeded",
    "StrataClient",
    "fund_channel",
    "stream_chunks",
]
