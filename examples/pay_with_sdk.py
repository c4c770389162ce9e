"""Pay for chat completions from a payment channel with the Strata SDK: one answer through the SDK's own client,
then one streamed through OpenAI's, whose HTTP client is the SDK's (it answers every 402 with a voucher).

Run from the repository root, with `strata up` running and a channel opened by `strata client deposit` (README,
"The gateway: paying for a request"). It reads the environment `strata client` reads:

    CLIENT_KEY       the payer's hex private key, read from a file: export CLIENT_KEY="$(cat .strata/keys/client-1.key)"
    CHANNEL_ID       the channel to pay from, 0x-prefixed hex as `strata client deposit` prints it
    GATEWAY_URL      the gateway (default http://127.0.0.1:8000)
    DEPLOYMENT_FILE  where the escrow's address and the chain id are read (default .strata/deployment.json)
    MODEL            the model to ask (default tiny, the one `strata up` serves)
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from eth_account import Account
from openai import AsyncOpenAI

from marketplace.client import ChannelWallet, StrataClient
from settlement.deploy import Deployment


async def main() -> None:
    missing = [name for name in ("CLIENT_KEY", "CHANNEL_ID") if not os.environ.get(name)]
    if missing:
        sys.exit(f"set {' and '.join(missing)} first (see the README)")
    account = Account.from_key(os.environ["CLIENT_KEY"])
    channel_id = bytes.fromhex(os.environ["CHANNEL_ID"].removeprefix("0x"))  # the SDK takes the id's 32 bytes
    deployment = Deployment.load(Path(os.environ.get("DEPLOYMENT_FILE", ".strata/deployment.json")))
    gateway_url = os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000")
    model = os.environ.get("MODEL", "tiny")
    messages = [{"role": "user", "content": "Hello"}]

    wallet = ChannelWallet(
        account, channel_id, escrow=deployment.addresses["VoucherEscrow"], chain_id=deployment.chain_id
    )
    async with StrataClient(gateway_url, wallet) as strata:
        answer = await strata.chat(model, messages, max_tokens=32)
        print("SDK:", answer["choices"][0]["message"]["content"])

        openai = AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="unused", http_client=strata.http)
        stream = await openai.chat.completions.create(
            model=model, messages=messages, max_tokens=32, stream=True
        )
        print("OpenAI's client, streamed: ", end="")
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
    print(f"channel {wallet.channel_hex}: {wallet.charged} base units charged in all")


if __name__ == "__main__":
    asyncio.run(main())
