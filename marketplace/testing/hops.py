"""Provider processes, and the gateway's side of the hop protocol, for tests and benchmarks that need routes
without a chain: a deployment record naming a StakeManager (the protocol's signing domain), a gateway key,
provider nodes on TLS with their certificates made up front, and a route driven the way the coordinator drives
one (tickets, open, steps, direct closes).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from eth_account import Account
from eth_account.signers.local import LocalAccount

from marketplace.devnet.process import free_port
from marketplace.devnet.providers import ProviderLaunch, ProviderProcess
from marketplace.gateway.coordinator import plan_route
from marketplace.gateway.orderbook import BookAsk
from settlement.deploy import Deployment
from settlement.eip712 import Domain, protocol_domain
from settlement.tickets import KeyRing, SignatureChecks
from worker.client import HopPlan, Peers, RouteClient, StepResult
from worker.messages import SignedReceipt

CHAIN_ID = 31337
STAKE_MANAGER = "0x5a5A5a5a5A5a5a5A5a5a5A5A5a5a5A5A5A5a5a5A"  # names the deployment; no chain is needed
GATEWAY_ACCOUNT: LocalAccount = Account.from_key(b"\x42" * 32)
VALIDATOR_ACCOUNT: LocalAccount = Account.from_key(b"\x07" * 32)
DOMAIN: Domain = protocol_domain(CHAIN_ID, STAKE_MANAGER)


def gateway_keys(account: LocalAccount = GATEWAY_ACCOUNT, domain: Domain = DOMAIN) -> KeyRing:
    return KeyRing(account, domain)


def checks(domain: Domain = DOMAIN) -> SignatureChecks:
    return SignatureChecks(domain)


def write_deployment(path: Path, *, stake_manager: str = STAKE_MANAGER, slasher: str | None = None) -> Path:
    """A deployment record for providers run without a chain: what they sign under, and whom they let fetch."""
    Deployment(
        chain_id=CHAIN_ID,
        addresses={"StakeManager": stake_manager},
        abi_hashes={},
        roles={"slasher": slasher or VALIDATOR_ACCOUNT.address},
        params={},
        block_number=0,
    ).save(path)
    return path


@dataclass
class Served:
    """A provider node running as a process, and the ask a gateway would have booked for it."""

    account: LocalAccount
    node: ProviderProcess
    ask: BookAsk

    @property
    def endpoint(self) -> str:
        return self.ask.endpoint


def launch(
    model: Path,
    span: tuple[int, int],
    *,
    seed: int,
    root: str,
    workdir: Path,
    deployment: Path,
    gateway: str = GATEWAY_ACCOUNT.address,
    plaintext: bool = False,
    extra: Sequence[str] = (),
    threads: int = 1,
    env: dict[str, str] | None = None,
) -> Served:
    """Starts `strata provider serve` for ``span`` (not waiting for it); its key is made from ``seed``."""
    account = Account.from_key(seed.to_bytes(32, "big"))
    tls_dir = None if plaintext else workdir / f"tls-{seed}"
    command = ProviderLaunch(
        model,
        f"{span[0]}:{span[1]}",
        free_port(),
        trust_gateway=gateway,
        deployment=deployment,
        tls_dir=tls_dir,
        retained_dir=workdir / f"retained-{seed}",
        extra=tuple(extra),
    )
    node = ProviderProcess.start(
        command, key=account.key.hex(), log=workdir / f"provider-{seed}.log", env=env, threads=threads
    )
    ask = BookAsk(
        id=seed,
        provider=account.address,
        model_root=root,
        start=span[0],
        end=span[1],
        price_per_million=1_000_000,
        capacity=64,
        endpoint=node.endpoint,
        tls_fingerprint=node.fingerprint,
        expires_at=time.time() + 3600,
    )
    return Served(account, node, ask)


@contextmanager
def running(served: list[Served], *, timeout_s: float = 300.0) -> Iterator[list[Served]]:
    try:
        for provider in served:
            provider.node.wait_ready(timeout_s)
        yield served
    finally:
        for provider in served:
            provider.node.stop()


def plan(
    route: Sequence[Served],
    *,
    root: str,
    max_positions: int = 1024,
    keys: KeyRing | None = None,
    job_id: bytes | None = None,
    expires_in_s: int = 120,
    ring: bool = False,  # tickets for a token ring (RouteClient.generate then runs it as one)
) -> list[HopPlan]:
    return plan_route(
        keys or gateway_keys(),
        [provider.ask for provider in route],
        job_id=job_id or os.urandom(32),
        model_root=bytes.fromhex(root.removeprefix("0x")),
        max_positions=max_positions,
        expires_at=int(time.time()) + expires_in_s,
        ring=ring,
    )


@dataclass
class Generation:
    tokens: list[int]
    steps: list[StepResult]
    receipts: list[SignedReceipt | None]
    plans: list[HopPlan]


async def generate(
    peers: Peers,
    plans: list[HopPlan],
    prompt: list[int],
    *,
    vocab_size: int,
    max_tokens: int,
    sampling: dict[str, Any] | None = None,
    logits: bool = False,
    domain: Domain = DOMAIN,
) -> Generation:
    """A whole job on one route as the coordinator runs it: open, prefill, decode, close every hop directly."""
    client = RouteClient(plans, peers, checks=checks(domain), vocab_size=vocab_size)
    tokens, steps = await client.generate(
        prompt, max_tokens=max_tokens, sampling=sampling or {}, logits=logits
    )
    receipts = await client.close()
    return Generation(tokens, steps, receipts, plans)


def prompt_tensor(ids: list[int]) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.int64)
