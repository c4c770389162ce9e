"""The hop server in-process: abandoned sessions are freed without anyone asking."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import torch
from eth_account import Account

from settlement.anvil import free_port
from settlement.tickets import GatewayTicketVerifier, KeyReceiptSigner, issue_ticket
from worker.client import ConnectionPool, RouteClient
from worker.errors import HopFailed
from worker.runtime import RuntimeLimits, SpanRuntime
from worker.server import HopServer
from worker.shard import load_shard
from worker.tiny import BOS
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
