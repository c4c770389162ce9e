"""Provider processes chained peer to peer over TLS: the same tokens and logits as generate(), every hop's
signed account of every step, each provider's own signed receipt collected directly, and tickets and
steps that do not follow the protocol refused with their codes. tests/marketplace/test_adversary.py attacks it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from marketplace.testing.hops import (
    Generation,
    Served,
    checks,
    gateway_keys,
    generate,
    launch,
    plan,
    running,
    write_deployment,
)
from settlement.tickets import KeyRing
from worker.client import Peers, RouteClient
from worker.errors import HopRefused, StepFailed
from worker.messages import Open
from worker.shard import model_root
from worker.testing.tiny import BOS
from worker.transcript import receipt_bills, sampling_hash, transcript_root
from worker.trust import ReceiptFields

PROMPT = [BOS, *b"Peer to peer, layer by layer. "]
NEW_TOKENS = 10
SPLITS = {1: [(0, 6)], 2: [(0, 3), (3, 6)], 3: [(0, 2), (2, 5), (5, 6)]}
ARCHS = ("llama", "qwen2", "gpt2", "mixtral")
VOCAB = 259  # the tiny checkpoints' byte-level vocabulary


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_deployment(tmp_path_factory.mktemp("deployment") / "deployment.json")


def start_splits(model: Path, workdir: Path, deployment: Path) -> dict[int, list[Served]]:
    root = model_root(model)
    return {
        count: [
            launch(model, span, seed=100 * count + i + 1, root=root, workdir=workdir, deployment=deployment)
            for i, span in enumerate(spans)
        ]
        for count, spans in SPLITS.items()
    }


@pytest.fixture(scope="module")
def llama(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, deployment: Path
) -> Iterator[dict[int, list[Served]]]:
    routes = start_splits(tiny_models["llama"], tmp_path_factory.mktemp("llama-providers"), deployment)
    with running([p for route in routes.values() for p in route]):
        yield routes


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def drive(route: list[Served], model: Path, **options: object) -> Generation:
    async def go() -> Generation:
        peers = Peers(gateway_keys())
        try:
            return await generate(
                peers,
                plan(route, root=model_root(model)),
                PROMPT,
                vocab_size=VOCAB,
                max_tokens=NEW_TOKENS,
                **options,  # type: ignore[arg-type]
            )
        finally:
            await peers.close()

    return run(go())  # type: ignore[return-value]


@pytest.mark.parametrize("arch", ARCHS)
def test_provider_processes_generate_like_the_whole_model(
    tiny_models: dict[str, Path],
    llama: dict[int, list[Served]],
    arch: str,
    tmp_path: Path,
    deployment: Path,
) -> None:
    if arch == "llama":
        for route in llama.values():
            check_generation(tiny_models[arch], route)
        return
    routes = start_splits(tiny_models[arch], tmp_path, deployment)
    with running([p for route in routes.values() for p in route]):
        for route in routes.values():
            check_generation(tiny_models[arch], route)


def check_generation(model: Path, route: list[Served]) -> None:
    generation = drive(route, model, logits=True)
    reference = AutoModelForCausalLM.from_pretrained(model).eval()
    expected = reference.generate(
        torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=reference.config.pad_token_id,
    )  # fmt: skip
    assert generation.tokens == expected.sequences[0, len(PROMPT) :].tolist()
    logits = torch.cat([s.logits for s in generation.steps])  # type: ignore[misc]
    torch.testing.assert_close(logits, torch.cat(expected.logits), rtol=0, atol=1e-4)

    # Each provider's own receipt bills exactly what it reported step by step; the last commits to the tokens.
    positions = len(PROMPT) + NEW_TOKENS - 1
    for index, (receipt, provider, plan_) in enumerate(
        zip(generation.receipts, route, generation.plans, strict=True)
    ):
        steps = [step.hops[index] for step in generation.steps]
        assert receipt is not None
        expected_fields = ReceiptFields(
            plan_.ticket.job_id, plan_.ticket.session, gateway_keys().address, provider.account.address,
            plan_.ticket.model_root, provider.ask.start, provider.ask.end, positions, transcript_root(steps),
            sampling_hash({} if index == len(route) - 1 else None),
        )  # fmt: skip
        assert receipt_bills(receipt, expected_fields, checks().receipt) is None
        last = index == len(route) - 1
        assert receipt.sampling_hash == (sampling_hash({}) if last else sampling_hash(None))
        assert [s.token for s in steps] == (generation.tokens if last else [None] * NEW_TOKENS)


def open_error(route: list[Served], model: Path, **ticket: object) -> HopRefused:
    """The refusal of the first hop to open a session whose ticket is ``plan``'s with ``ticket`` changed."""
    keys: KeyRing = ticket.pop("keys", gateway_keys())  # type: ignore[assignment]
    plans = plan(route, root=str(ticket.pop("root", model_root(model))), keys=keys, **ticket)  # type: ignore[arg-type]

    async def go() -> None:
        peers = Peers(keys)
        try:
            hop = plans[0]
            reply, _ = await peers.get(hop.endpoint, hop.fingerprint).request(Open(hop.ticket).to_json())
            from worker.messages import checked

            checked(reply)
        finally:
            await peers.close()

    with pytest.raises(HopRefused) as caught:
        run(go())
    return caught.value


def test_expired_and_overlong_tickets_and_other_models_are_refused(
    tiny_models: dict[str, Path], llama: dict[int, list[Served]]
) -> None:
    route, model = llama[1], tiny_models["llama"]
    assert open_error(route, model, expires_in_s=-1).code == "ticket_refused"
    assert open_error(route, model, expires_in_s=10_000).code == "ticket_refused"
    assert open_error(route, model, root=model_root(tiny_models["qwen2"])).code == "ticket_refused"
    # More positions than this provider takes in a session: out of room, as a full cache is, so the gateway
    # routes around it without blaming it.
    assert open_error(route, model, max_positions=1_000_000).code == "provider_busy"


def test_steps_out_of_order_and_beyond_the_tickets_positions_are_refused(
    tiny_models: dict[str, Path], llama: dict[int, list[Served]]
) -> None:
    route = llama[1]

    async def go(max_positions: int, first_step: int) -> StepFailed:
        peers = Peers(gateway_keys())
        client = RouteClient(
            plan(route, root=model_root(tiny_models["llama"]), max_positions=max_positions),
            peers,
            checks=checks(),
            vocab_size=VOCAB,
        )
        try:
            await client.open({})
            await client.step(0, torch.tensor([PROMPT]))
            with pytest.raises(StepFailed) as caught:
                await client.step(first_step, torch.tensor([[5]]))
            return caught.value
        finally:
            await peers.close()

    failed = run(go(1024, 2))
    assert "step_out_of_order" in str(failed) and failed.blame.positions == [0]  # type: ignore[attr-defined]
    refused = run(go(len(PROMPT), 1))  # the prompt used up every position the ticket allows
    assert refused.blame.positions == [0]  # type: ignore[attr-defined]


def test_a_session_id_is_opened_once(tiny_models: dict[str, Path], llama: dict[int, list[Served]]) -> None:
    route = llama[1]
    plans = plan(route, root=model_root(tiny_models["llama"]))

    async def go() -> HopRefused:
        peers = Peers(gateway_keys())
        try:
            link = peers.get(plans[0].endpoint, plans[0].fingerprint)
            request = Open(plans[0].ticket, {}).to_json()
            from worker.messages import checked

            checked((await link.request(request))[0])
            with pytest.raises(HopRefused) as caught:
                checked((await link.request(request))[0])
            return caught.value
        finally:
            await peers.close()

    assert run(go()).code == "session_exists"  # type: ignore[attr-defined]


def test_an_unreachable_next_hop_is_blamed_on_whoever_the_gateway_cannot_reach(
    tiny_models: dict[str, Path], llama: dict[int, list[Served]], tmp_path: Path, deployment: Path
) -> None:
    model = tiny_models["llama"]
    first = llama[2][0]
    # A second hop that answered its open, then went away before the first step.
    dying = launch(model, (3, 6), seed=9_001, root=model_root(model), workdir=tmp_path, deployment=deployment)
    dying.node.wait_ready()
    plans = plan([first, dying], root=model_root(model))

    async def go() -> StepFailed:
        peers = Peers(gateway_keys())
        client = RouteClient(plans, peers, checks=checks(), vocab_size=VOCAB)
        try:
            await client.open({})
            dying.node.kill()
            with pytest.raises(StepFailed) as caught:
                await client.step(0, torch.tensor([PROMPT]))
            return caught.value
        finally:
            await peers.close()

    failed = run(go())
    assert "next_unreachable" in str(failed)
    assert failed.blame.positions == [1] and failed.blame.suspend  # type: ignore[attr-defined]


def test_a_gateway_the_provider_does_not_trust_cannot_open(
    tiny_models: dict[str, Path], llama: dict[int, list[Served]]
) -> None:
    from eth_account import Account

    from marketplace.testing.hops import DOMAIN

    stranger = KeyRing(Account.from_key(os.urandom(32)), DOMAIN)

    async def go() -> Exception:
        peers = Peers(stranger)
        try:
            hop = plan(llama[1], root=model_root(tiny_models["llama"]), keys=stranger)[0]
            with pytest.raises(Exception) as caught:
                await peers.get(hop.endpoint, hop.fingerprint).request(Open(hop.ticket).to_json())
            return caught.value
        finally:
            await peers.close()

    error = run(go())
    assert getattr(error, "code", None) == "unauthenticated"  # refused at the handshake: no business there
