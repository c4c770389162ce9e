"""The client SDK: pays a Strata gateway's 402s with vouchers on a payment channel, automatically.

    wallet = ChannelWallet(account, channel_id, escrow=ESCROW, chain_id=31337)
    async with StrataClient("http://127.0.0.1:8000", wallet) as strata:
        answer = await strata.chat("tiny", [{"role": "user", "content": "hello"}], max_tokens=16)

or hand OpenAI's client an HTTP client that pays:

    openai = AsyncOpenAI(base_url=".../v1", api_key="unused", http_client=strata.http)

How a voucher's amount is chosen. A channel's vouchers are cumulative: each one promises the channel's total so
far, and the gateway takes one only if it is above the newest it accepted and covers everything charged or
reserved on the channel plus the new quote. The wallet signs

    max(newest signed + 1, charged + quotes in flight + this quote)

where ``charged`` is the channel's cumulative charge as the gateway last reported it (``PAYMENT-RESPONSE``, or
the ``payment`` field of a stream's last chunk). Because charges are metered and often below the quote, this
keeps the signed total close to what was really spent, not to the sum of quotes. When the wallet's view is
stale (a stream it did not read to the end, another process using the channel) the gateway's refusal carries
the channel's real figures, and the wallet re-signs once from them.

Deposits: a voucher above the channel's deposit is refused. Given ``fund`` (an on-chain deposit, see
:func:`fund_channel`) and ``top_up``, the wallet deposits ``top_up`` more whenever a voucher would exceed the
deposit; without them it raises :class:`InsufficientDeposit` before sending anything.
"""

from marketplace.client.http import PayingTransport, StrataClient, stream_chunks
from marketplace.client.wallet import ChannelWallet, InsufficientDeposit, PaymentFailed, fund_channel

__all__ = [
    "ChannelWallet",
    "InsufficientDeposit",
    "PayingTransport",
    "PaymentFailed",
    "StrataClient",
    "fund_channel",
    "stream_chunks",
]
