"""Provider processes chained peer to peer: same tokens and logits as generate(), transcripts that link hop to
hop, signed receipts, and every bad request refused with its code."""

from __future__ import annotations

import asyncio
import itertools
import os
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from eth_account import Account
from eth_account.signers.local import LocalAccount
from transformers import AutoModelForCausalLM

from marketplace.devnet.process import free_port
from marketplace.devnet.providers import ProviderLaunch, ProviderProcess
from settlement.tickets import issue_ticket, receipt_signer
from worker.client import ConnectionPool, RouteClient
from worker.errors import HopFailed
from worker.protocol import read_message
from worker.receipts import ReceiptFields, transcript_root_of
from worker.shard import load_shard
from worker.testing.tiny import BOS
from worker.wire import FrameLimits, encode_frame

CHAIN_ID = 31337
PROMPT = [BOS, *b"Peer to peer, layer by layer. "]
NEW_TOKENS = 10
SPLITS = {1: ["0:6"], 2: ["0:3", "3:6"], 3: ["0:2", "2:5", "5:6"]}
ARCHS = ("llama", "qwen2", "gpt2", "mixtral")
GATEWAY: LocalAccount = Account.from_key(b"\x42" * 32)
LIMITS = FrameLimits()
STRATA = str(Path(sys.executable).with_name("strata"))


@dataclass
class Provider:
    span: str
    endpoint: str
    account: LocalAccount


def start_provider(model: Path, span: str, seed: int, logs: Path) -> tuple[Provider, ProviderProcess]:
    account = Account.from_key(seed.to_bytes(32, "big"))
    launch = ProviderLaunch(model, span, free_port(), trust_gateway=GATEWAY.address, chain_id=CHAIN_ID)
    node = ProviderProcess.start(launch, key=account.key.hex(), log=logs / f"provider-{seed}.log")
    return Provider(span, launch.endpoint, account), node


@contextmanager
def running(model: Path, logs: Path) -> Iterator[dict[int, list[Provider]]]:
    """The routes of SPLITS over ``model``, one process per span, started together."""
    started = {
        count: [start_provider(model, span, 100 * count + i + 1, logs) for i, span in enumerate(spans)]
        for count, spans in SPLITS.items()
    }
    nodes = [node for route in started.values() for _, node in route]
    try:
        for node in nodes:
            node.wait_ready()
        yield {count: [provider for provider, _ in route] for count, route in started.items()}
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def llama(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[int, list[Provider]]]:
    with running(tiny_models["llama"], tmp_path_factory.mktemp("llama-providers")) as routes:
        yield routes


def ticket_for(model: Path, *, signer: LocalAccount = GATEWAY, expires_in_s: int = 600) -> dict[str, object]:
    root = bytes.fromhex(load_shard(model, "0:1").root.removeprefix("0x"))
    return issue_ticket(
        signer,
        job_id=os.urandom(32),
        model_root=root,
        expires_at=int(time.time()) + expires_in_s,
        chain_id=CHAIN_ID,
    )


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ARCHS)
def test_provider_processes_generate_like_the_whole_model(
    tiny_models: dict[str, Path], llama: dict[int, list[Provider]], arch: str, tmp_path: Path
) -> None:
    if arch == "llama":
        for count, route in llama.items():
            check_generation(tiny_models[arch], route, count)
        return
    with running(tiny_models[arch], tmp_path) as routes:
        for count, route in routes.items():
            check_generation(tiny_models[arch], route, count)


def check_generation(model: Path, route: list[Provider], count: int) -> None:
    ticket = ticket_for(model)
    session = os.urandom(16)

    async def drive() -> tuple[list[int], list[object], list[dict[str, object]]]:
        pool = ConnectionPool(LIMITS)
        client = RouteClient([p.endpoint for p in route], ticket, pool)
        try:
            tokens, steps = await client.generate(session, PROMPT, max_tokens=NEW_TOKENS, logits=True)
            receipts = await client.close(session)
        finally:
            await pool.close()
        return tokens, steps, receipts

    tokens, steps, receipts = run(drive())  # type: ignore[misc]
    reference = AutoModelForCausalLM.from_pretrained(model).eval()
    expected = reference.generate(
        torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=reference.config.pad_token_id,
    )  # fmt: skip
    assert tokens == expected.sequences[0, len(PROMPT) :].tolist()
    logits = torch.cat([s.logits for s in steps])  # type: ignore[attr-defined]
    torch.testing.assert_close(logits, torch.cat(expected.logits), rtol=0, atol=1e-4)

    # Every step's transcript links hop to hop; each receipt is signed by its provider over those hashes.
    for step in steps:
        hops = step.transcript  # type: ignore[attr-defined]
        assert [h["provider"] for h in hops] == [p.account.address for p in route]
        assert all(a["out"] == b["in"] for a, b in itertools.pairwise(hops))
    assert len(receipts) == count
    job_id = bytes.fromhex(str(ticket["jobId"])[2:])
    root = bytes.fromhex(str(ticket["modelRoot"])[2:])
    for index, (receipt, provider) in enumerate(zip(receipts, route, strict=True)):
        start, end = (int(x) for x in provider.span.split(":"))
        per_step = [
            (n, bytes.fromhex(s.transcript[index]["in"]), bytes.fromhex(s.transcript[index]["out"]))  # type: ignore[attr-defined]
            for n, s in enumerate(steps)
        ]
        fields = ReceiptFields(
            job_id, provider.account.address, root, start, end,
            tokens=len(PROMPT) + NEW_TOKENS - 1, transcript_root=transcript_root_of(per_step),
        )  # fmt: skip
        assert receipt["transcriptRoot"] == fields.transcript_root.hex()
        signature = bytes.fromhex(str(receipt["signature"]))
        assert receipt_signer(fields, signature, chain_id=CHAIN_ID) == provider.account.address


def _first_step_error(route: list[Provider], ticket: dict[str, object], *, step: int = 0) -> HopFailed:
    async def drive() -> None:
        pool = ConnectionPool(LIMITS)
        try:
            await RouteClient([p.endpoint for p in route], ticket, pool).step(
                os.urandom(16), step, torch.tensor([PROMPT]), {}
            )
        finally:
            await pool.close()

    with pytest.raises(HopFailed) as caught:
        run(drive())
    return caught.value


def test_forged_expired_and_missing_tickets_are_refused(
    tiny_models: dict[str, Path], llama: dict[int, list[Provider]]
) -> None:
    route = llama[2]
    model = tiny_models["llama"]
    forged = ticket_for(model, signer=Account.from_key(b"\x07" * 32))
    expired = ticket_for(model, expires_in_s=-1)
    tampered = {**ticket_for(model), "expiresAt": int(time.time()) + 10_000}
    other_model = ticket_for(tiny_models["qwen2"])
    for ticket in (forged, expired, tampered, other_model, {}):
        error = _first_step_error(route, ticket)
        assert error.code == "ticket_refused", error
        assert error.hop == route[0].endpoint


def test_steps_out_of_order_and_unknown_sessions(
    tiny_models: dict[str, Path], llama: dict[int, list[Provider]]
) -> None:
    route = llama[1]
    assert _first_step_error(route, ticket_for(tiny_models["llama"]), step=3).code == "unknown_session"

    async def drive() -> HopFailed:
        pool = ConnectionPool(LIMITS)
        client = RouteClient([route[0].endpoint], ticket_for(tiny_models["llama"]), pool)
        session = os.urandom(16)
        try:
            await client.step(session, 0, torch.tensor([PROMPT]), {})
            with pytest.raises(HopFailed) as caught:
                await client.step(session, 2, torch.tensor([[5]]))
            return caught.value
        finally:
            await pool.close()

    assert run(drive()).code == "step_out_of_order"  # type: ignore[attr-defined]


def test_routes_that_stop_short_or_run_past_the_last_layer(
    tiny_models: dict[str, Path], llama: dict[int, list[Provider]]
) -> None:
    first, last = llama[2]
    ticket = ticket_for(tiny_models["llama"])
    assert _first_step_error([first], ticket).code == "bad_hop_message"
    assert _first_step_error([last, first], ticket).code == "bad_hop_message"


def test_unreachable_next_hop_is_named(
    tiny_models: dict[str, Path], llama: dict[int, list[Provider]]
) -> None:
    first = llama[2][0]
    dead = Provider("3:6", f"127.0.0.1:{free_port()}", GATEWAY)
    error = _first_step_error([first, dead], ticket_for(tiny_models["llama"]))
    assert error.code == "hop_unreachable"
    assert error.hop == first.endpoint  # the provider that could not reach the next one reports it
    assert dead.endpoint in str(error)


async def _raw_exchange(endpoint: str, payload: bytes) -> dict[str, object]:
    host, port = endpoint.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    reply = await read_message(reader, LIMITS)
    writer.close()
    return reply.control


def _step_message(frame: bytes, session: bytes) -> bytes:
    control = b'{"op":"step","session":"' + session.hex().encode() + b'","step":0,"route":[],"ticket":{}}'
    return struct.pack("<I", len(control)) + control + struct.pack("<Q", len(frame)) + frame


def test_tampered_and_oversized_frames_are_refused(llama: dict[int, list[Provider]]) -> None:
    endpoint = llama[1][0].endpoint
    session = os.urandom(16)
    frame = bytearray(encode_frame(torch.tensor([PROMPT]), session=session, step=0))
    frame[-1] ^= 0x01
    reply = run(_raw_exchange(endpoint, _step_message(bytes(frame), session)))
    assert reply["error"]["code"] == "frame_hash_mismatch"  # type: ignore[index]

    # A header that announces more than the provider accepts is refused before any payload is sent.
    huge = bytearray(encode_frame(torch.zeros((1, 1), dtype=torch.int64), session=session, step=0))
    struct.pack_into("<I", huge, 8, 1_000_000)
    struct.pack_into("<I", huge, 12, 100_000)
    struct.pack_into("<Q", huge, 48, 1_000_000 * 100_000 * 8)
    header_only = bytes(huge[:88])
    message = _step_message(header_only, session)
    message = message[: -88 - 8] + struct.pack("<Q", 88 + 1_000_000 * 100_000 * 8) + header_only
    reply = run(_raw_exchange(endpoint, message))
    assert reply["error"]["code"] == "frame_too_large"  # type: ignore[index]
