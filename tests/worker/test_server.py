"""The hop server in-process: abandoned sessions are freed without anyone asking."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from eth_account import Account

from marketplace.devnet.process import free_port
from settlement.tickets import GatewayTicketVerifier, KeyReceiptSigner, issue_ticket
from worker.client import ConnectionPool, RouteClient, fetch_retained
from worker.errors import HopFailed, ProtocolError
from worker.runtime import RuntimeLimits, SpanRuntime
from worker.server import HopServer
from worker.shard import load_shard
from worker.testing.tiny import BOS
from worker.wire import FrameLimits

GATEWAY = Account.from_key(b"\x42" * 32)


def test_abandoned_sessions_expire(tiny_models: dict[str, Path]) -> None:
    shard = load_shard(tiny_models["llama"], "0:6", device=torch.device("cpu"))
    runtime = SpanRuntime(shard, RuntimeLimits(session_idle_s=0.05, retention_s=0.05))
    port = free_port()
    server = HopServer(
        runtime,
        endpoint=f"127.0.0.1:{port}",
        verify_ticket=GatewayTicketVerifier([GATEWAY.address], chain_id=31337),
        sign_receipt=KeyReceiptSigner(Account.from_key(b"\x01" * 32), chain_id=31337),
    )
    ticket = issue_ticket(
        GATEWAY,
        job_id=os.urandom(32),
        model_root=bytes.fromhex(shard.root[2:]),
        expires_at=int(time.time()) + 60,
        chain_id=31337,
    )

    async def drive() -> None:
        await server.start("127.0.0.1", port, expire_every_s=0.05)
        pool = ConnectionPool(FrameLimits())
        client = RouteClient([f"127.0.0.1:{port}"], ticket, pool)
        session = os.urandom(16)
        try:
            await client.step(session, 0, torch.tensor([[BOS, 1, 2]]), {})
            assert runtime.is_open(session)
            await asyncio.sleep(0.3)
            assert not runtime.is_open(session)
            with pytest.raises(HopFailed) as caught:
                await client.step(session, 1, torch.tensor([[3]]))
            assert caught.value.code == "unknown_session"
        finally:
            await pool.close()
            await server.close()

    asyncio.run(drive())


def test_validators_fetch_retained_steps_and_nobody_else(tiny_models: dict[str, Path]) -> None:
    shard = load_shard(tiny_models["llama"], "0:3", device=torch.device("cpu"))
    runtime = SpanRuntime(shard)
    port = free_port()
    validator = Account.from_key(b"\x07" * 32)
    server = HopServer(
        runtime,
        endpoint=f"127.0.0.1:{port}",
        verify_ticket=GatewayTicketVerifier([GATEWAY.address], chain_id=31337),
        sign_receipt=KeyReceiptSigner(Account.from_key(b"\x01" * 32), chain_id=31337),
        verify_fetch=GatewayTicketVerifier([validator.address], chain_id=31337),
    )
    job, other_job = os.urandom(32), os.urandom(32)
    root = bytes.fromhex(shard.root[2:])

    def ticket(signer: Any, job_id: bytes) -> dict[str, Any]:
        return issue_ticket(
            signer, job_id=job_id, model_root=root, expires_at=int(time.time()) + 60, chain_id=31337
        )

    async def drive() -> None:
        await server.start("127.0.0.1", port)
        pool = ConnectionPool(FrameLimits())
        session = os.urandom(16)
        try:
            # A span that is not the last forwards: run it as the only hop by stepping the runtime directly.
            runtime.open(session, job)
            runtime.step(session, 0, torch.tensor([[BOS, 1, 2]]))
            runtime.step(session, 1, torch.tensor([[3]]))
            runtime.close(session)
            connection = pool.get(f"127.0.0.1:{port}")
            steps = await fetch_retained(connection, session, ticket(validator, job), max_steps=2)
            kept = runtime.retained(session)
            assert [s.step for s in steps] == [0, 1]
            assert [(s.input_hash, s.output_hash) for s in steps] == [
                (r.input_hash, r.output_hash) for r in kept
            ]
            assert torch.equal(steps[1].output, kept[1].output)

            refusals = [
                (
                    ticket(GATEWAY, job),
                    "ticket_refused",
                ),  # a gateway's ticket travels the route: never enough
                (ticket(validator, other_job), "unknown_session"),  # a ticket for one job opens no other
            ]
            for wrong, code in refusals:
                with pytest.raises(HopFailed) as caught:
                    await fetch_retained(connection, session, wrong, max_steps=2)
                assert caught.value.code == code
            with pytest.raises(HopFailed) as caught:
                await fetch_retained(connection, os.urandom(16), ticket(validator, job), max_steps=2)
            assert caught.value.code == "unknown_session"
            with pytest.raises(ProtocolError):  # more steps than the transcript has: not what was signed
                await fetch_retained(connection, session, ticket(validator, job), max_steps=1)
        finally:
            await pool.close()
            await server.close()

    asyncio.run(drive())
