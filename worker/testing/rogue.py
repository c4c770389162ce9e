"""Providers that attack the hop protocol, for the adversarial tests and benchmark. Each serves its span honestly
and then deviates in one way; the protocol must expose it, blame it, and leave the honest providers around it
paid and unblamed. ``strata provider serve --misbehave KIND`` (a hidden option) runs one.

Every misbehaviour has a form on each of the two ways a session runs (worker.messages): on the request/reply
chain (``_step``, ``_forward``) and on the token ring (``_push``, ``_ring_step``, the follow stream, ``_account``),
so one rogue process attacks whichever way the gateway drives it. Where the two differ, the ring's form follows
the slash:

    alter-downstream   relays the next hop's report with that hop's output hash changed, its signature kept / pushes
                       the step on with the reports before it altered (the first hop's output hash), their
                       signatures kept, its own signed over the altered ones
    forge-error        does not send the step on; reports, in the next hop's name, an error it never sent / its
                       account of the step is that forged report
    blame-next         does not send the step on; says the next hop could not be reached (its own signed word, on
                       the ring in its account)
    substitute-token   (last span) emits another token than the one it sampled, to the gateway and (ring) to the
                       first hop alike; its logits stay honest
    ignore-constraints (last span) samples as if the session had no grammar and no logit_bias, while its receipt
                       commits to the parameters it was opened with
    close-others       with every step, also tries to close the session at ``target`` (another provider's)
    inject-step        with every step, also sends a step of its own into the session at ``target`` / pushes one
    replay-step        sends each step on twice, and relays the next hop's (honest, signed) refusal of the second /
                       pushes each step on twice, and the step before it again
    garbage-report     answers every step with a report whose signature is nobody's / (last span) streams the
                       gateway, and pushes the first hop, reports whose signature is nobody's
    stall              never answers a step / from step 2 on, computes nothing more and pushes nothing on
    silent-close       never answers a close: it hopes the route's receipts wait for it
    inflate-receipt    signs a receipt for half as many positions again as it served
    inflate-positions  sends every decode step on with its position doubled, signing for what it sent: the hops
                       after it would sign receipts for more positions than the gateway sent

Ring only (on a chain they serve honestly):

    split-token        (last span) from step 2 on, pushes the first hop another token than the one it streams the
                       gateway, signing for each: two signed entries of its own for one step
    withhold-token     (last span) from step 2 on, streams the gateway each step's report but pushes no token on,
                       while its account says it did: the first hop's word against its own
    lie-account        (middle span) from step 2 on, pushes nothing on, and its account says the step never reached
                       it, framing the hop before, which says it sent it
    unasked-logits     (middle span) pushes every step on asking the last hop for logits the gateway never asked
                       for, hoping the gateway takes the last hop's stream, with its unexpected frames, for broken
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from worker.client import PeerLink
from worker.errors import WorkerError
from worker.messages import Account, Close, HopEntry, HopError, Open, Push, Report, SignedReceipt, Step, hex0x
from worker.sampling import Sampler, SamplingParams
from worker.server import HopServer
from worker.trust import ReceiptFields
from worker.wire import payload_sha256

log = logging.getLogger(__name__)

MISBEHAVIOURS = (
    "alter-downstream", "forge-error", "blame-next", "substitute-token", "ignore-constraints", "close-others",
    "inject-step",
    "replay-step", "garbage-report", "stall", "silent-close", "inflate-receipt", "inflate-positions",
    "split-token", "withhold-token", "lie-account", "unasked-logits",
)  # fmt: skip
RING_FROM_STEP = 2  # where the ring's mid-stream misbehaviours start: tokens already reached the client


class RogueServer(HopServer):
    def __init__(
        self, *args: Any, misbehave: str, target: tuple[str, bytes] | None = None, **kwargs: Any
    ) -> None:
        if misbehave not in MISBEHAVIOURS:
            raise ValueError(f"unknown misbehaviour {misbehave!r}; choose one of {', '.join(MISBEHAVIOURS)}")
        if misbehave in ("close-others", "inject-step") and target is None:
            raise ValueError(f"{misbehave} needs a target endpoint and its certificate")
        super().__init__(*args, **kwargs)
        self.misbehave = misbehave
        self.target = target
        self._inflated: dict[bytes, bytes] = {}  # inflate-positions: the session's last step as sent, hashed
        self._forged: set[tuple[bytes, int]] = set()  # forge-error, ring: (session, step) it sent nowhere
        self._denied: set[tuple[bytes, int]] = set()  # lie-account: (session, step) it says it never had
        self.attempts: list[str] = []  # what the target answered each time it was attacked

    async def _forward(
        self, ticket: Any, request: Step, output: torch.Tensor, output_hash: bytes, left_s: float
    ) -> tuple[Mapping[str, Any] | None, torch.Tensor | None, HopError | None]:
        if self.misbehave in ("close-others", "inject-step"):
            await self._interfere(request)
        if self.misbehave == "blame-next":
            return None, None, HopError("next_unreachable", f"{ticket.next_endpoint}: connection refused")
        if self.misbehave == "forge-error":
            forged = HopEntry(
                ticket.next, request.session, request.step, error=HopError("provider_busy", "full")
            )
            return Report(forged, os.urandom(65)).to_json(), None, None
        if self.misbehave == "inflate-positions" and request.positions == 1:
            output = torch.cat([output, output], dim=1)
            output_hash = payload_sha256(output)
            request = replace(request, positions=2)
            self._inflated[request.session] = output_hash
        downstream, logits, failure = await super()._forward(ticket, request, output, output_hash, left_s)
        if self.misbehave == "replay-step" and downstream is not None:
            # The same step again: the next hop refuses it as out of order, in an entry it signs.
            again, _, failure = await super()._forward(ticket, request, output, output_hash, left_s)
            return again, None, failure
        if self.misbehave == "alter-downstream" and downstream is not None:
            report = Report.from_json(downstream)
            altered = replace(report.entry, output=bytes(32))  # its signature kept
            downstream = replace(report, entry=altered).to_json()
        return downstream, logits, failure

    async def _open(self, request: Open, peer: str) -> dict[str, Any]:
        reply = await super()._open(request, peer)
        session = self._sessions.get(request.ticket.session)
        if session is None or session.sampler is None:
            return reply
        if self.misbehave == "ignore-constraints":
            loose = {k: v for k, v in (request.sampling or {}).items() if k not in ("grammar", "logit_bias")}
            session.sampler = Sampler(
                SamplingParams.from_dict(loose)
            )  # session.sampling, signed, is unchanged
        if self.misbehave == "substitute-token":
            session.sampler = _Substituting(
                SamplingParams.from_dict(request.sampling or {}), self.runtime.shard.vocab_size
            )
        if self.misbehave == "garbage-report" and session.outbox is not None:
            session.outbox = _Garbling()
        return reply

    def _close(self, request: Close, peer: str) -> dict[str, Any]:
        if self.misbehave == "silent-close":
            raise _Silent
        reply = super()._close(request, peer)
        if self.misbehave == "inflate-receipt":
            said = SignedReceipt.from_json(reply["receipt"])
            fields = {name: getattr(said, name) for name in ReceiptFields.__dataclass_fields__}
            inflated = ReceiptFields(**{**fields, "positions": said.positions * 3 // 2})
            reply = {**reply, "receipt": self.keys.receipt(inflated).to_json()}
        return reply

    async def _handle(self, request: Any, reader: asyncio.StreamReader, peer: str, verified: Any) -> Any:
        try:
            return await super()._handle(request, reader, peer, verified)
        except _Silent:
            await asyncio.Event().wait()

    async def _interfere(self, request: Step) -> None:
        assert self.target is not None
        endpoint, fingerprint = self.target
        link = PeerLink(endpoint, fingerprint, self.keys, tls=any(fingerprint))
        try:
            if self.misbehave == "close-others":
                reply, _ = await link.request(Close(request.session).to_json())
            else:
                bogus = torch.zeros((1, 1, self.runtime.shard.hidden_size), dtype=torch.float32)
                attack = Step(request.session, request.step + 1, 1)
                reply, _ = await link.request(
                    attack.to_json(), bogus, session=request.session, step=request.step + 1
                )
            self.attempts.append(str(reply.get("error", reply)))
        except (TimeoutError, WorkerError, OSError) as exc:
            self.attempts.append(f"refused: {exc!r}")
        finally:
            await link.close()
        log.warning("%s against %s: %s", self.misbehave, endpoint, self.attempts[-1])

    async def _step(
        self, request: Step, reader: asyncio.StreamReader, peer: str
    ) -> tuple[dict[str, Any], Any, Any]:
        reply, logits, sha = await super()._step(request, reader, peer)
        if self.misbehave == "stall":
            await asyncio.Event().wait()
        inflated = self._inflated.pop(request.session, None)
        if (
            inflated is not None and "report" in reply
        ):  # it signs for the step it sent on, as an honest hop does
            report = Report.from_json(reply["report"])
            entry = replace(report.entry, output=inflated)
            signed = Report.signed(self.keys.hop_report, entry, report.downstream, report.compute_ms)
            return {"report": signed.to_json()}, logits, sha
        if self.misbehave == "garbage-report" and "report" in reply:
            report = Report.from_json(reply["report"])
            return {"report": replace(report, signature=os.urandom(65)).to_json()}, logits, sha
        return reply, logits, sha

    # -- the ring -------------------------------------------------------------------------------------------

    async def _push(
        self, ticket: Any, push: Push, tensor: torch.Tensor, sha256: bytes | None
    ) -> HopError | None:
        kind = self.misbehave
        last = self.runtime.shard.span.last
        # The step this push is of: on the last hop the token goes on as the next step's input.
        step = push.step - 1 if last else push.step
        if kind in ("close-others", "inject-step"):
            await self._interfere_ring(push)
        elif kind == "blame-next":
            return HopError("next_unreachable", f"{ticket.next_endpoint}: connection refused")
        elif kind == "forge-error":
            self._forged.add((push.session, step))
            return None  # and its account of the step is the next hop's forged error
        elif kind == "alter-downstream" and push.report is not None:
            mine = Report.from_json(push.report)
            below = mine.nested()
            if below is not None:
                altered = replace(
                    below, entry=replace(below.entry, output=bytes(32))
                ).to_json()  # signature kept
                signed = Report.signed(self.keys.hop_report, mine.entry, altered, mine.compute_ms)
                push = replace(push, report=signed.to_json())
        elif kind == "garbage-report" and push.report is not None:
            push = replace(push, report={**push.report, "signature": hex0x(os.urandom(65))})
        elif kind == "inflate-positions" and push.positions == 1 and push.report is not None:
            tensor = torch.cat([tensor, tensor], dim=1)
            sha256 = payload_sha256(tensor)
            mine = Report.from_json(push.report)  # it signs for the step it sends on, as an honest hop does
            entry = replace(mine.entry, output=sha256)
            signed = Report.signed(self.keys.hop_report, entry, mine.downstream, mine.compute_ms)
            push = replace(push, positions=2, report=signed.to_json())
        elif kind == "split-token" and step >= RING_FROM_STEP and push.report is not None:
            # Another token to the first hop, signed: the gateway's copy of the step says the sampled one.
            said = Report.from_json(push.report)
            token = ((said.entry.token or 0) + 1) % self.runtime.shard.vocab_size
            entry = replace(said.entry, token=token)
            forged = Report(
                entry, self.keys.hop_report(*Report.digests(entry, None, said.below)), below=said.below
            )
            push = replace(push, report=forged.to_json())
            tensor, sha256 = torch.tensor([[token]], dtype=torch.int64), None
        elif kind in ("withhold-token", "lie-account") and step >= RING_FROM_STEP:
            if kind == "lie-account":
                self._denied.add((push.session, step))
            return None  # sent nowhere; its account says it was sent on (or, lying, never received)
        elif kind == "unasked-logits":
            push = replace(push, logits=True)
        failure = await super()._push(ticket, push, tensor, sha256)
        if kind == "replay-step" and failure is None:
            await super()._push(ticket, push, tensor, sha256)  # the same step again
            if push.step >= 1 and push.report is not None:  # and the one before, with this step's report
                await super()._push(ticket, replace(push, step=push.step - 1), tensor, sha256)
        return failure

    async def _ring_step(self, session: Any, request: Push, frame: Any, peer: str) -> None:
        if self.misbehave == "stall" and request.step >= RING_FROM_STEP:
            await asyncio.Event().wait()  # holds the step, computes nothing, pushes nothing: until the close
        await super()._ring_step(session, request, frame, peer)

    def _account(self, request: Account, peer: str) -> dict[str, Any]:
        reply = super()._account(request, peer)
        session = self._sessions.get(request.session)
        key = (request.session, request.step)
        if key in self._forged and session is not None:
            forged = HopEntry(
                session.ticket.next, request.session, request.step, error=HopError("provider_busy", "full")
            )
            return {"ok": True, "report": Report(forged, os.urandom(65)).to_json()}
        if key in self._denied:
            error = HopError("not_received", f"step {request.step}")
            entry = HopEntry(self.address, request.session, request.step, error=error)
            return {"ok": True, "report": Report.signed(self.keys.hop_report, entry).to_json()}
        return reply

    async def _interfere_ring(self, push: Push) -> None:
        """On a ring the target's session takes pushes: a step of its own, one-way, or a close."""
        assert self.target is not None
        endpoint, fingerprint = self.target
        link = PeerLink(endpoint, fingerprint, self.keys, tls=any(fingerprint))
        try:
            if self.misbehave == "close-others":
                reply, _ = await link.request(Close(push.session).to_json())
                self.attempts.append(str(reply.get("error", reply)))
            else:
                bogus = torch.zeros((1, 1, self.runtime.shard.hidden_size), dtype=torch.float32)
                attack = Push(push.session, push.step + 1, 1)
                await link.send(attack.to_json(), bogus, session=push.session, step=push.step + 1)
                # No reply to a push: whether the target took it shows in the job, and in a hang-up.
                self.attempts.append(f"sent: {await _answer(link)}")
        except (TimeoutError, WorkerError, OSError) as exc:
            self.attempts.append(f"refused: {exc!r}")
        finally:
            await link.close()
        log.warning("%s against %s: %s", self.misbehave, endpoint, self.attempts[-1])


async def _answer(link: PeerLink) -> str:
    """What the target said after a push (a refusal, then the end of the stream), or that it said nothing."""
    try:
        reply, _ = await link.receive(None, 1.0)
    except (WorkerError, OSError):
        return "nothing"
    return str(reply.get("error", reply))


class _Substituting(Sampler):
    """Emits the token after the one it draws, and counts that one as emitted."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        super().__init__(params)
        self.vocab_size = vocab_size

    def next_token(self, logits: torch.Tensor) -> int:
        token = (self.draw(logits) + 1) % self.vocab_size
        self.accept(token)
        return token


class _Garbling(asyncio.Queue[Any]):
    """A follow stream's outbox whose reports go out with a signature that is nobody's."""

    def put_nowait(self, item: Any) -> None:
        if isinstance(item, tuple):
            report, logits, step = item
            item = ({**report, "signature": hex0x(os.urandom(65))}, logits, step)
        super().put_nowait(item)


class _Silent(Exception):
    """Raised by a close that is never to be answered."""
