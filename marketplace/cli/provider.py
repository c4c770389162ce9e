"""`strata provider`: run a provider node serving a span of a model's layers, post or withdraw its ask on a
gateway, and (from :mod:`marketplace.cli.staking`) stake, unstake, withdraw, see its status and claim payouts.

A gateway matches only staked providers: `ask` checks StakeManager before it posts, and `serve --gateway`, which
needs no chain, stops at the gateway's refusal of its first ask; both fail with ``inactive_provider``.
"""

from __future__ import annotations

import asyncio
import functools
import re
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import httpx
import typer
from eth_account.signers.local import LocalAccount

from marketplace.cli import staking
from marketplace.cli.common import (
    console,
    emit_json,
    fail,
    parse_address,
    parse_http_url,
    reported,
)
from marketplace.cli.keys import KeyFileOption, KeystoreOption, require_account
from marketplace.cli.staking import (
    DeploymentOption,
    GatewayOption,
    GatewayRefused,
    JsonOption,
    ProviderSession,
    RpcOption,
)
from marketplace.provider.announce import DEFAULT_RETENTION_S, NOT_STAKED, AnnounceError, Announcer, Offer
from marketplace.provider.settings import ProviderSettings
from settlement.deploy import Deployment
from settlement.eip712 import Domain, protocol_domain
from settlement.errors import ConfigurationError
from worker.errors import ProtocolError, WorkerError

if TYPE_CHECKING:
    from worker.shard import Shard

app = typer.Typer(
    help="Stake, serve a span of a model's layers, and claim what it earns.", no_args_is_help=True
)
app.add_typer(staking.app)  # stake, unstake, withdraw, status, claim: commands of `strata provider` itself

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype choices: torch dtype names
MODEL_ROOT = re.compile(r"0x[0-9a-fA-F]{64}")

T = TypeVar("T")


@app.command("serve")
def serve_command(
    model: Annotated[Path, typer.Option("--model", help="a Hugging Face checkpoint directory")],
    layers: Annotated[str, typer.Option(help="the span to serve, start:end (end exclusive)")],
    port: Annotated[int, typer.Option(min=1, max=65535)],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    advertise: Annotated[str | None, typer.Option(help="host:port others reach this provider at")] = None,
    key_file: KeyFileOption = None,
    keystore: KeystoreOption = None,
    trust_gateway: Annotated[
        list[str] | None,
        typer.Option(help="gateway address whose tickets to accept [default: GATEWAY_ADDRESSES]"),
    ] = None,
    trust_validator: Annotated[
        list[str] | None,
        typer.Option(
            help="validator address allowed to fetch retained steps [default: VALIDATOR_ADDRESSES, else the "
            "deployment's slasher]"
        ),
    ] = None,
    deployment: DeploymentOption = None,
    tls_dir: Annotated[
        Path | None,
        typer.Option(
            help="where the node's TLS key and certificate are kept (made on first start) "
            "[default: PROVIDER_TLS_DIR, else .strata/provider-tls/ADDRESS]"
        ),
    ] = None,
    retained_dir: Annotated[
        Path | None,
        typer.Option(
            help="where steps are kept for validators, read back on restart "
            "[default: PROVIDER_RETAINED_DIR, else .strata/retained/ADDRESS/START-END]"
        ),
    ] = None,
    retained_bytes: Annotated[
        int, typer.Option(min=1 << 20, help="disk kept steps may take; past it, new sessions are refused")
    ] = 64 << 30,
    plaintext: Annotated[
        bool,
        typer.Option(
            "--plaintext",
            help="serve and forward over plain TCP, unauthenticated and readable: development only",
        ),
    ] = False,
    dtype: Annotated[
        str, typer.Option(help="auto, fp32, bf16 or fp16 (auto: fp32 on CPU, bf16 on GPU)")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    max_sessions: Annotated[
        int, typer.Option(min=1, help="sessions the runtime keeps open at once, decoding in one batch")
    ] = 64,
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
        int | None,
        typer.Option(
            min=1,
            help="the ask's capacity: concurrent sessions batched, which gateways spread sessions by; "
            "at most --max-sessions [default: max-sessions]",
        ),
    ] = None,
    retention_s: Annotated[
        int,
        typer.Option(
            min=1,
            help="seconds a session's steps are kept for validators after it ends; the ask says so, and gateways "
            "refuse asks under their validation window and margin",
        ),
    ] = DEFAULT_RETENTION_S,
    cheat: Annotated[
        str | None,
        typer.Option(hidden=True, help="serve dishonestly (worker.testing.cheats): demonstrations only"),
    ] = None,
    misbehave: Annotated[
        str | None,
        typer.Option(hidden=True, help="attack the hop protocol (worker.testing.rogue): tests only"),
    ] = None,
    misbehave_target: Annotated[
        str | None, typer.Option(hidden=True, help="HOST:PORT@FINGERPRINT another provider it attacks")
    ] = None,
) -> None:
    """Load a span of a model and serve it; steps are forwarded straight to the next provider on the route."""
    if capacity is not None and capacity > max_sessions:
        raise typer.BadParameter(
            f"{capacity} sessions is more than the runtime admits (--max-sessions {max_sessions}): a gateway "
            "would match sessions the node refuses",
            param_hint="--capacity",
        )
    # The model's stack is imported here, not at the top: every other `strata` command would wait for it.
    import torch

    from marketplace.provider.node import Announcement, NodeConfig, NotStaked, ProviderNode
    from worker.runtime import RuntimeLimits
    from worker.server import HopServer
    from worker.testing.cheats import CHEATS, make_cheater
    from worker.tls import TlsIdentity

    settings = ProviderSettings()
    account = require_account(
        key_file=key_file,
        keystore=keystore,
        env_key=settings.provider_key,
        env_name="PROVIDER_KEY",
        role="provider",
    )
    gateways = [parse_address(a) for a in (trust_gateway or settings.gateway_addresses)]
    if not gateways:
        fail("no trusted gateway: pass --trust-gateway or set GATEWAY_ADDRESSES", "missing_gateway")
    if dtype != "auto" and dtype not in DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of auto, {', '.join(DTYPES)}", param_hint="--dtype")
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"{device!r} is not one of auto, cpu, cuda", param_hint="--device")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but no CUDA device is available", "no_cuda")
    try:
        record = Deployment.load(deployment or settings.deployment_file)
    except ConfigurationError as exc:
        fail(f"{exc}: the node signs and checks under the deployment's domain", exc.code)
    validators = [parse_address(a) for a in (trust_validator or settings.validator_addresses)]
    if not validators and record.roles.get("slasher"):
        # A provider that lets no validator fetch its retained steps fails every validation it is drawn for.
        validators = [record.roles["slasher"]]
    if cheat is not None and cheat not in CHEATS:
        raise typer.BadParameter(f"{cheat!r} is not one of {', '.join(CHEATS)}", param_hint="--cheat")
    gateway_url = gateway or settings.gateway_url
    announce = None
    if gateway_url is not None:
        if price is None:
            raise typer.BadParameter(
                "a provider that announces itself to a gateway needs --price", param_hint="--price"
            )
        announce = Announcement(parse_http_url(gateway_url), price, capacity or max_sessions)
    tls = None
    if not plaintext:
        tls = TlsIdentity.load_or_create(
            tls_dir or settings.provider_tls_dir or Path(".strata") / "provider-tls" / account.address
        )
    config = NodeConfig(
        model=model,
        layers=layers,
        host=host,
        port=port,
        account=account,
        gateways=tuple(gateways),
        validators=tuple(validators),
        domain=protocol_domain(record.chain_id, record.addresses["StakeManager"]),
        tls=tls,
        limits=RuntimeLimits(
            max_sessions=max_sessions,
            max_cached_tokens=max_cached_tokens,
            retention_s=retention_s,
            max_retained_bytes=retained_bytes,
        ),
        retained=retained_dir
        or settings.provider_retained_dir
        or Path(".strata") / "retained" / account.address / layers.replace(":", "-"),
        advertise=advertise,
        device=None if device == "auto" else torch.device(device),
        dtype=None if dtype == "auto" else getattr(torch, DTYPES[dtype]),
        announce=announce,
    )

    def dishonest(shard: Shard) -> Shard:
        assert cheat is not None
        try:
            return make_cheater(shard, cheat)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--cheat") from exc

    server: Any = HopServer
    if misbehave is not None:
        from worker.testing.rogue import MISBEHAVIOURS, RogueServer

        if misbehave not in MISBEHAVIOURS:
            raise typer.BadParameter(
                f"{misbehave!r} is not one of {', '.join(MISBEHAVIOURS)}", param_hint="--misbehave"
            )
        target = None
        if misbehave_target is not None:
            endpoint, _, fingerprint = misbehave_target.partition("@")
            target = (endpoint, bytes.fromhex(fingerprint.removeprefix("0x")))
        server = functools.partial(RogueServer, misbehave=misbehave, target=target)
    try:
        with console.status(f"Loading layers {layers} of {model}…"):
            node = ProviderNode.load(config, adapt=dishonest if cheat is not None else None, server=server)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--layers") from exc
    except WorkerError as exc:
        fail(str(exc), exc.code)

    async def serve() -> None:
        """Serves until SIGINT or SIGTERM."""
        await node.start()
        shard = node.shard
        link = (
            f"TLS certificate 0x{tls.fingerprint.hex()}"
            if tls is not None
            else "PLAINTEXT (development only)"
        )
        console.print(
            f"Serving layers {shard.span} of model {shard.root} on {host}:{port} as {account.address} "
            f"({shard.device.type}, {str(shard.dtype).removeprefix('torch.')}), {link}",
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
        await node.stop()

    try:
        asyncio.run(serve())
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc}", "listen_failed")
    except NotStaked as exc:
        fail(f"{exc}; run `strata provider stake AMOUNT` first", "inactive_provider")


def parse_model_root(value: str) -> str:
    if not MODEL_ROOT.fullmatch(value):
        raise typer.BadParameter(
            f"{value!r} is not a model root (0x and 64 hex digits)", param_hint="--model-root"
        )
    return value.lower()


def parse_fingerprint(value: str) -> bytes:
    if not MODEL_ROOT.fullmatch(value):  # the same form: 0x and 64 hex digits
        raise typer.BadParameter(
            f"{value!r} is not a certificate fingerprint (0x and 64 hex digits)",
            param_hint="--tls-fingerprint",
        )
    return bytes.fromhex(value[2:])


def parse_layers(value: str) -> tuple[int, int]:
    start, sep, end = value.partition(":")
    if not (sep and start.isdigit() and end.isdigit() and int(start) < int(end)):
        raise typer.BadParameter(f"{value!r} is not a span start:end with start < end", param_hint="--layers")
    return int(start), int(end)


def parse_endpoint_option(value: str) -> str:
    from worker.client import parse_endpoint

    try:
        parse_endpoint(value)
    except ProtocolError as exc:
        raise typer.BadParameter(str(exc), param_hint="--endpoint") from exc
    return value


@app.command("ask")
def ask_command(
    model_root: Annotated[
        str | None,
        typer.Option("--model-root", help="the model's root, 0x + 64 hex (`strata model inspect`)"),
    ] = None,
    layers: Annotated[str | None, typer.Option(help="the span, start:end (end exclusive)")] = None,
    price: Annotated[
        int | None, typer.Option(min=1, help="token base units per million token-layers")
    ] = None,
    capacity: Annotated[
        int,
        typer.Option(
            min=1,
            help="concurrent sessions your hop server batches, which gateways spread sessions by; "
            "at most its --max-sessions",
        ),
    ] = 64,
    retention_s: Annotated[
        int, typer.Option(min=1, help="seconds your hop server keeps a session's steps (its --retention-s)")
    ] = DEFAULT_RETENTION_S,
    endpoint: Annotated[
        str | None, typer.Option(help="host:port the gateway and other providers reach your hop server at")
    ] = None,
    tls_fingerprint: Annotated[
        str | None,
        typer.Option(
            help="sha256 of your hop server's TLS certificate, 0x + 64 hex (`serve` prints it); "
            "0x00…00 for a plaintext development server"
        ),
    ] = None,
    withdraw: Annotated[
        bool,
        typer.Option(
            "--withdraw",
            help="withdraw your live asks on the gateway instead (those of --model-root and --layers, if given)",
        ),
    ] = False,
    key_file: KeyFileOption = None,
    keystore: KeystoreOption = None,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
    gateway: GatewayOption = None,
    as_json: JsonOption = False,
) -> None:
    """Post, replace or withdraw your signed ask on a gateway, for a hop server you run yourself.

    A new ask for the same model and span replaces the old one. The ask goes with one heartbeat: the gateway
    matches a provider only while it heartbeats (`serve --gateway` does, every few seconds)."""
    root = parse_model_root(model_root) if model_root is not None else None
    span = parse_layers(layers) if layers is not None else None
    endpoint = parse_endpoint_option(endpoint) if endpoint is not None else None
    fingerprint = parse_fingerprint(tls_fingerprint) if tls_fingerprint is not None else None
    offer = (
        None
        if withdraw
        else _offer_of_options(root, span, price, capacity, endpoint, fingerprint, retention_s)
    )
    session = ProviderSession(
        key_file=key_file, keystore=keystore, rpc=rpc, deployment=deployment, gateway=gateway, as_json=as_json
    )
    account = session.signer()
    with reported(as_json=as_json):
        active = session.contracts.stake.is_active(account.address)
        domain = protocol_domain(session.contracts.chain.chain_id, session.contracts.stake.address)
    if not active:
        session.fail(
            f"{account.address} is not staked (or below the minimum stake): gateways refuse its asks, withdrawals "
            "included, and match none of them; run `strata provider stake AMOUNT` first",
            "inactive_provider",
        )
    if offer is None:
        _withdraw_asks(session, account, domain, root, span)
        return
    announcer = Announcer(session.gateway_url, account, offer, domain=domain, trusted=None)

    async def post() -> tuple[dict[str, Any], int | None]:
        try:
            posted = await announcer.post_ask()
            try:
                until: int | None = int((await announcer.heartbeat())["matchableUntil"])
            except AnnounceError as exc:
                if exc.code != "stale_heartbeat":  # a running `serve --gateway` heartbeated this second
                    raise
                until = None
            return posted, until
        finally:
            await announcer.aclose()

    with console.status(f"Posting the ask to {session.gateway_url}…"):
        posted, until = _announced(session, post)
    if as_json:
        emit_json({"provider": account.address, "ask": posted["ask"], "matchableUntil": until})
        return
    console.print(
        f"Ask posted: layers {offer.layer_start}:{offer.layer_end} of {offer.model_root} at {offer.price_per_million} "
        f"base units per million token-layers, {offer.capacity} sessions, at {offer.endpoint}."
    )


def _offer_of_options(
    root: str | None,
    span: tuple[int, int] | None,
    price: int | None,
    capacity: int,
    endpoint: str | None,
    fingerprint: bytes | None,
    retention_s: int,
) -> Offer:
    if root is None:
        raise typer.BadParameter("posting an ask needs the model's root", param_hint="--model-root")
    if span is None:
        raise typer.BadParameter("posting an ask needs a span", param_hint="--layers")
    if price is None:
        raise typer.BadParameter("posting an ask needs a price", param_hint="--price")
    if endpoint is None:
        raise typer.BadParameter("posting an ask needs your hop server's host:port", param_hint="--endpoint")
    if fingerprint is None:
        raise typer.BadParameter(
            "posting an ask needs your hop server's certificate fingerprint", param_hint="--tls-fingerprint"
        )
    return Offer(root, span[0], span[1], price, capacity, endpoint, fingerprint, retention_s)


def _withdraw_asks(
    session: ProviderSession,
    account: LocalAccount,
    domain: Domain,
    root: str | None,
    span: tuple[int, int] | None,
) -> None:
    """Withdraws the provider's live asks on the gateway that match ``root`` and ``span`` (all when None), each
    by re-signing it with capacity 0."""
    try:
        live: list[dict[str, Any]] = session.get(f"/v1/providers/{account.address}")["asks"]
    except GatewayRefused as exc:
        if exc.code != "unknown_provider":  # unknown: it never posted an ask there
            session.fail(str(exc), exc.code)
        live = []
    offers = [
        Offer(
            ask["modelRoot"],
            int(ask["layers"][0]),
            int(ask["layers"][1]),
            int(ask["pricePerMillion"]),
            int(ask["capacity"]),
            str(ask["endpoint"]),
            bytes.fromhex(str(ask["tlsFingerprint"]).removeprefix("0x")),
            int(ask["retentionS"]),
        )
        for ask in live
    ]
    chosen = [
        o
        for o in offers
        if (root is None or o.model_root.lower() == root)
        and (span is None or (o.layer_start, o.layer_end) == span)
    ]
    if chosen:
        # One announcer for them all: its nonces rise from one withdrawal to the next.
        announcer = Announcer(session.gateway_url, account, chosen[0], domain=domain, trusted=None)

        async def post() -> None:
            try:
                for offer in chosen:
                    announcer.offer = offer
                    await announcer.withdraw()
            finally:
                await announcer.aclose()

        with console.status(f"Withdrawing {len(chosen)} ask(s) from {session.gateway_url}…"):
            _announced(session, post)
    withdrawn = [{"modelRoot": o.model_root, "layers": [o.layer_start, o.layer_end]} for o in chosen]
    if session.as_json:
        emit_json({"provider": account.address, "withdrawn": withdrawn})
        return
    if not chosen:
        console.print(f"No live ask of {account.address} on {session.gateway_url} to withdraw.")
    for o in chosen:
        console.print(f"Withdrew the ask for layers {o.layer_start}:{o.layer_end} of {o.model_root}.")


def _announced(session: ProviderSession, action: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Runs an announcing coroutine; the gateway's refusals fail the command with the gateway's code."""
    try:
        return asyncio.run(action())
    except AnnounceError as exc:
        if exc.code == NOT_STAKED:
            session.fail(f"{exc}: run `strata provider stake AMOUNT` first", "inactive_provider")
        unreachable = isinstance(exc.__cause__, httpx.HTTPError)
        session.fail(str(exc), exc.code or ("gateway_unavailable" if unreachable else "gateway_error"))
