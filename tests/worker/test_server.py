"""The hop server in-process, over TLS: abandoned sessions are freed without anyone asking, and validators read
retained steps only with a ticket naming this provider and that session, over a link they authenticated."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import torch
from eth_account import Account

from marketplace.devnet.process import free_port
from marketplace.gateway.orderbook import BookAsk
from marketplace.testing.hops import DOMAIN, VALIDATOR_ACCOUNT, checks, gateway_keys, plan
from marketplace.testing.hops import Served as _Served
from marketplace.testing.latency import DelayProxy
from settlement.tickets import KeyRing
from settlement.validator import fetch_budget_s
from worker.client import PeerLink, Peers, RetainedStep, RouteClient, fetch_retained
from worker.errors import CertificateMismatch, HopRefused, StepFailed, Unauthenticated
from worker.messages import Close, FetchTicket, Open
from worker.protocol import read_control
from worker.runtime import RuntimeLimits, SpanRuntime
from worker.server import HopServer, ServerLimits
from worker.shard import load_shard
from worker.testing.tiny import BOS
from worker.tls import TlsIdentity
from worker.wire import FrameLimits

PROVIDER = Account.from_key(b"\x01" * 32)
LIMITS = FrameLimits(max_payload_bytes=1 << 24, max_elements=1 << 22)


def serve(
    runtime: SpanRuntime, tmp_path: Path, *, plaintext: bool = False, limits: ServerLimits | None = None
) -> tuple[HopServer, int]:
    server = HopServer(
        runtime,
        keys=KeyRing(PROVIDER, DOMAIN),
        checks=checks(),
        gateways={gateway_keys().address},
        validators={VALIDATOR_ACCOUNT.address},
        tls=None if plaintext else TlsIdentity.load_or_create(tmp_path / "tls"),
        limits=limits,
    )
    return server, free_port()


def test_plaintext_serves_only_clients_that_allow_it(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The development switch: a plaintext provider still authenticates its clients, and a client links to it
    only when it allows plaintext itself."""
    shard = load_shard(tiny_models["llama"], "0:6", device=torch.device("cpu"))
    server, port = serve(SpanRuntime(shard), tmp_path, plaintext=True)
    hop = served(server, port)

    async def drive() -> int:
        await server.start("127.0.0.1", port)
        try:
            with pytest.raises(CertificateMismatch):
                Peers(gateway_keys()).get(hop.endpoint, hop.ask.tls_fingerprint)
            peers = Peers(gateway_keys(), allow_plaintext=True)
            client = RouteClient(
                plan([hop], root=shard.root), peers, checks=checks(), vocab_size=shard.vocab_size
            )
            try:
                await client.open({})
                return (await client.step(0, torch.tensor([[BOS, 1, 2]]))).token
            finally:
                await peers.close()
        finally:
            await server.close()

    assert 0 <= asyncio.run(drive()) < shard.vocab_size


def served(server: HopServer, port: int) -> _Served:
    shard = server.runtime.shard
    ask = BookAsk(
        1, PROVIDER.address, shard.root, shard.span.start, shard.span.end, 1, 8, f"127.0.0.1:{port}",
        server.fingerprint, time.time() + 60,
    )  # fmt: skip
    return _Served(PROVIDER, None, ask)  # type: ignore[arg-type]


def test_a_previous_hop_only_steps_and_holds_only_so_many_connections(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The provider before this one on an open session may connect (it has business here), but it may only send
    steps: anything else, a close of the session included, is refused and hung up on, so it cannot keep idle
    connections alive with chatter. And it holds at most ``max_connections_per_peer`` at once; the gateway,
    trusted, is never counted against a cap."""
    shard = load_shard(tiny_models["llama"], "3:6", device=torch.device("cpu"))
    server, port = serve(SpanRuntime(shard), tmp_path, limits=ServerLimits(max_connections_per_peer=2))
    upstream = KeyRing(Account.from_key(b"\x02" * 32), DOMAIN)
    before = BookAsk(
        2, upstream.address, shard.root, 0, 3, 1, 8, "127.0.0.1:9", bytes(32), time.time() + 60
    )  # fmt: skip
    previous = _Served(upstream.account, None, before)  # type: ignore[arg-type]
    hops = plan([previous, served(server, port)], root=shard.root)
    endpoint = f"127.0.0.1:{port}"

    def upstream_link() -> PeerLink:
        return PeerLink(endpoint, server.fingerprint, upstream, tls=True)

    async def first_reply(link: PeerLink) -> str:
        """The refusal a connection over the cap gets before it asks anything."""
        reader, _ = await link._connected()
        return str((await read_control(reader))["error"]["code"])

    async def drive() -> None:
        await server.start("127.0.0.1", port)
        gateway = Peers(gateway_keys())
        held = [upstream_link() for _ in range(3)]
        try:
            checked = await gateway.get(endpoint, server.fingerprint).request(Open(hops[1].ticket).to_json())
            assert checked[0].get("ok") is True

            closing = upstream_link()
            reply, _ = await closing.request(Close(hops[1].ticket.session).to_json())
            assert reply["error"]["code"] == "not_authorised"
            assert closing._reader is not None and await closing._reader.read() == b""  # hung up
            await closing.close()

            for link in held[:2]:
                await link._connected()
            assert await first_reply(held[2]) == "provider_busy"
            await held[2].close()
            # The gateway's own connections are not capped by the previous hop's.
            for _ in range(3):
                link = PeerLink(endpoint, server.fingerprint, gateway_keys(), tls=True)
                await link._connected()
                held.append(link)
            # One of the two ends: the previous hop may connect again.
            await held[0].close()
            for _ in range(50):
                await asyncio.sleep(0.02)
                if not server._connected_from.get(upstream.address, 0) >= 2:
                    break
            again = upstream_link()
            held.append(again)
            reply, _ = await again.request(Close(hops[1].ticket.session).to_json())
            assert reply["error"]["code"] == "not_authorised"  # served, not turned away at the door
        finally:
            for link in held:
                await link.close()
            await gateway.close()
            await server.close()

    asyncio.run(drive())


def test_abandoned_sessions_expire(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    shard = load_shard(tiny_models["llama"], "0:6", device=torch.device("cpu"))
    runtime = SpanRuntime(shard, RuntimeLimits(session_idle_s=0.05, retention_s=0.05))
    server, port = serve(runtime, tmp_path)

    async def drive() -> None:
        await server.start("127.0.0.1", port, expire_every_s=0.05)
        peers = Peers(gateway_keys())
        client = RouteClient(
            plan([served(server, port)], root=shard.root), peers, checks=checks(), vocab_size=shard.vocab_size
        )
        try:
            await client.open({})
            await client.step(0, torch.tensor([[BOS, 1, 2]]))
            assert runtime.is_open(client.session)
            await asyncio.sleep(0.3)
            assert not runtime.is_open(client.session)
            with pytest.raises(StepFailed):  # the session is gone: the provider no longer takes its steps
                await client.step(1, torch.tensor([[3]]))
        finally:
            await peers.close()
            await server.close()

    asyncio.run(drive())


def test_validators_fetch_retained_steps_of_the_session_their_ticket_names(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    shard = load_shard(tiny_models["llama"], "0:3", device=torch.device("cpu"))
    runtime = SpanRuntime(shard)
    server, port = serve(runtime, tmp_path)
    validator = KeyRing(VALIDATOR_ACCOUNT, DOMAIN)
    job, other_job = os.urandom(32), os.urandom(32)
    session, other_session = os.urandom(16), os.urandom(16)
    expires = int(time.time()) + 60

    async def drive() -> None:
        await server.start("127.0.0.1", port)
        peers = Peers(validator)
        try:
            # Steps of two sessions, run on the runtime directly: a span that is not the last only forwards.
            for sid, jid in ((session, job), (other_session, other_job)):
                runtime.open(sid, jid)
                runtime.step(sid, 0, torch.tensor([[BOS, 1, 2]]))
                runtime.step(sid, 1, torch.tensor([[3]]))
                runtime.close(sid)
            link = peers.get(f"127.0.0.1:{port}", server.fingerprint)
            ticket = validator.fetch_ticket(
                job_id=job, session=session, provider=PROVIDER.address, expires_at=expires
            )
            steps = await fetch_retained(link, ticket, max_steps=2, limits=LIMITS)
            kept = runtime.retained(session)
            assert [s.step for s in steps] == [0, 1]
            assert [(s.input_hash, s.output_hash) for s in steps] == [
                (r.input_hash, r.output_hash) for r in kept
            ]
            assert torch.equal(steps[1].output, kept[1].output)

            def fetch_ticket(**changed: object) -> FetchTicket:
                fields = {
                    "job_id": job,
                    "session": session,
                    "provider": PROVIDER.address,
                    "expires_at": expires,
                }
                return validator.fetch_ticket(**{**fields, **changed})  # type: ignore[arg-type]

            # Another provider's ticket, another session's (it opens no other), an expired one.
            refusals = [
                (fetch_ticket(provider=VALIDATOR_ACCOUNT.address), "ticket_refused"),
                (fetch_ticket(session=other_session), "unknown_session"),
                (fetch_ticket(expires_at=1), "ticket_refused"),
            ]
            for wrong, code in refusals:
                with pytest.raises(HopRefused) as caught:
                    await fetch_retained(link, wrong, max_steps=2, limits=LIMITS)
                assert caught.value.code == code
            # More steps kept than the transcript has (a ring that ran past the steps billed): the billed first.
            (first,) = await fetch_retained(link, ticket, max_steps=1, limits=LIMITS)
            assert first.input_hash == steps[0].input_hash and first.output_hash == steps[0].output_hash

            # A ticket that saw the wire is no use to anyone else: the link must be the signer's own.
            thief = Peers(KeyRing(Account.from_key(os.urandom(32)), DOMAIN))
            with pytest.raises(Unauthenticated):
                await fetch_retained(
                    thief.get(f"127.0.0.1:{port}", server.fingerprint), ticket, max_steps=2, limits=LIMITS
                )
            await thief.close()
            # Nor to the gateway, which has business here but is not a validator.
            gateway = Peers(gateway_keys())
            with pytest.raises(HopRefused) as refused:
                await fetch_retained(
                    gateway.get(f"127.0.0.1:{port}", server.fingerprint), ticket, max_steps=2, limits=LIMITS
                )
            assert refused.value.code == "not_authorised"
            await gateway.close()
        finally:
            await peers.close()
            await server.close()

    asyncio.run(drive())


def test_a_long_session_is_fetched_over_a_slow_link_in_a_few_requests(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A validator 50 ms from the provider fetches a session of 25 steps. Step by step that was 50 round trips,
    over 5 s; in bulk it is a request for the inputs and one for the outputs, or a few more when the provider's
    replies are small, well within one request's timeout (2 s)."""
    shard = load_shard(tiny_models["llama"], "0:3", device=torch.device("cpu"))
    runtime = SpanRuntime(shard)
    validator = KeyRing(VALIDATOR_ACCOUNT, DOMAIN)
    job, session = os.urandom(32), os.urandom(16)
    runtime.open(session, job)
    runtime.step(session, 0, torch.tensor([[BOS, 1, 2]]))
    for step in range(1, 25):
        runtime.step(session, step, torch.tensor([[3 + step]]))
    runtime.close(session)
    kept = runtime.retained(session)
    ticket = validator.fetch_ticket(
        job_id=job, session=session, provider=PROVIDER.address, expires_at=int(time.time()) + 120
    )
    request_timeout_s = 2.0
    one_output = kept[1].output.numel() * kept[1].output.element_size()

    async def fetch(endpoint: str, server: HopServer, port: int) -> list[RetainedStep]:
        await server.start("127.0.0.1", port)
        link = PeerLink(
            endpoint, server.fingerprint, validator, tls=True, request_timeout_s=request_timeout_s
        )
        try:
            return await asyncio.wait_for(
                fetch_retained(link, ticket, max_steps=25, limits=LIMITS), request_timeout_s
            )
        finally:
            await link.close()
            await server.close()

    # Replies of every step at once, then of 10 outputs at most: the fetch pages through, and the steps come
    # back as they were kept either way.
    for reply_bytes in (ServerLimits().max_fetch_bytes, 10 * one_output):
        server, port = serve(runtime, tmp_path, limits=ServerLimits(max_fetch_bytes=reply_bytes))
        with DelayProxy(f"127.0.0.1:{port}", 0.05) as slow:
            steps = asyncio.run(fetch(slow.endpoint, server, port))
        assert [s.step for s in steps] == list(range(25))
        assert [(s.input_hash, s.output_hash) for s in steps] == [(r.input_hash, r.output_hash) for r in kept]
        assert all(
            torch.equal(s.input, r.input) and torch.equal(s.output, r.output)
            for s, r in zip(steps, kept, strict=True)
        )
    assert fetch_budget_s(25 * one_output, request_timeout_s) < 4.0  # what a validator allows such a session
