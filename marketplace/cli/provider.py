"""`strata provider`: run a provider node serving a span of a model's layers."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import torch
import typer
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from marketplace.announce import AnnounceError, Announcer, Offer
from marketplace.cli.common import console, fail, parse_address, parse_http_url, parse_key
from settlement.tickets import GatewayTicketVerifier, KeyReceiptSigner
from worker.errors import WorkerError
from worker.runtime import RuntimeLimits, SpanRuntime
from worker.server import HopServer
from worker.shard import load_shard

app = typer.Typer(help="Serve a span of a model's layers and get paid for it.", no_args_is_help=True)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ProviderSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    provider_key: SecretStr | None = Field(
        default=None, description="hex private key: signs receipts and asks"
    )
    gateway_addresses: list[str] = Field(
        default_factory=list, description="gateways whose job tickets are honoured"
    )
    chain_id: int = Field(default=31337, description="chain id in the EIP-712 domain of tickets and receipts")
    gateway_url: str | None = Field(default=None, description="gateway to post asks and heartbeats to")


@app.command("serve")
def serve_command(
    model: Annotated[Path, typer.Option("--model", help="a Hugging Face checkpoint directory")],
    layers: Annotated[str, typer.Option(help="the span to serve, start:end (end exclusive)")],
    port: Annotated[int, typer.Option(min=1, max=65535)],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    advertise: Annotated[str | None, typer.Option(help="host:port others reach this provider at")] = None,
    key: Annotated[
        str | None, typer.Option(help="provider's hex private key [default: PROVIDER_KEY]")
    ] = None,
    trust_gateway: Annotated[
        list[str] | None,
        typer.Option(help="gateway address whose tickets to accept [default: GATEWAY_ADDRESSES]"),
    ] = None,
    chain_id: Annotated[int | None, typer.Option(min=1, help="[default: CHAIN_ID or 31337]")] = None,
    dtype: Annotated[
        str, typer.Option(help="auto, fp32, bf16 or fp16 (auto: fp32 on CPU, bf16 on GPU)")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    max_sessions: Annotated[int, typer.Option(min=1)] = 64,
    max_cached_tokens: Annotated[
        int, typer.Option(min=1, help="KV cache positions over all sessions")
    ] = 65_536,
    gateway: Annotated[
        str | None, typer.Option(help="gateway URL to post the ask to and heartbeat [default: GATEWAY_URL]")
    ] = None,
    price: Annotated[
        int | None, typer.Option(min=1, help="ask price: token base units per million token-layers")
    ] = None,
    capacity: Annotated[
        int | None, typer.Option(min=1, help="sessions offered [default: max-sessions]")
    ] = None,
) -> None:
    """Load a span of a model and serve it; steps are forwarded straight to the next provider on the route."""
    settings = ProviderSettings()
    key_text = key or (settings.provider_key.get_secret_value() if settings.provider_key else None)
    if key_text is None:
        fail("no provider key: pass --key or set PROVIDER_KEY", "missing_key")
    account = parse_key(key_text)
    gateways = [parse_address(a) for a in (trust_gateway or settings.gateway_addresses)]
    if not gateways:
        fail("no trusted gateway: pass --trust-gateway or set GATEWAY_ADDRESSES", "missing_gateway")
    if dtype != "auto" and dtype not in DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of auto, {', '.join(DTYPES)}", param_hint="--dtype")
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"{device!r} is not one of auto, cpu, cuda", param_hint="--device")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but no CUDA device is available", "no_cuda")
    chain = chain_id or settings.chain_id
    gateway_url = gateway or settings.gateway_url
    if gateway_url is not None:
        gateway_url = parse_http_url(gateway_url)
        if price is None:
            raise typer.BadParameter(
                "a provider that announces itself to a gateway needs --price", param_hint="--price"
            )

    try:
        with console.status(f"Loading layers {layers} of {model}…"):
            shard = load_shard(
                model,
                layers,
                device=None if device == "auto" else torch.device(device),
                dtype=None if dtype == "auto" else DTYPES[dtype],
            )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--layers") from exc
    except WorkerError as exc:
        fail(str(exc), exc.code)
    runtime = SpanRuntime(
        shard, RuntimeLimits(max_sessions=max_sessions, max_cached_tokens=max_cached_tokens)
    )
    server = HopServer(
        runtime,
        endpoint=advertise or f"{host}:{port}",
        verify_ticket=GatewayTicketVerifier(gateways, chain_id=chain),
        sign_receipt=KeyReceiptSigner(account, chain_id=chain),
    )

    announcer = None
    if gateway_url is not None:
        assert price is not None
        announcer = Announcer(
            gateway_url,
            account,
            Offer(
                shard.root,
                shard.span.start,
                shard.span.end,
                price,
                capacity or max_sessions,
                advertise or f"{host}:{port}",
            ),
            chain_id=chain,
        )

    async def serve() -> None:
        await server.start(host, port)
        announcing = asyncio.create_task(announcer.run()) if announcer is not None else None
        console.print(
            f"Serving layers {shard.span} of model {shard.root} on {host}:{port} as {account.address} "
            f"({shard.device.type}, {str(shard.dtype).removeprefix('torch.')})",
            soft_wrap=True,
        )
        # Scripts and tests wait for this line; stdout may be a pipe, which Python buffers.
        console.print("ready", highlight=False)
        console.file.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        if announcer is not None and announcing is not None:
            announcing.cancel()
            try:
                await announcer.withdraw()  # stop being matched before the port closes
            except AnnounceError as exc:
                console.print(f"could not withdraw the ask: {exc}")
            await announcer.aclose()
        await server.close()

    try:
        asyncio.run(serve())
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc}", "listen_failed")
