"""Providers that attack the hop protocol, for the adversarial tests and benchmark. Each serves its span honestly
and then deviates in one way; the protocol must expose it, blame it, and leave the honest providers around it
paid and unblamed. ``strata provider serve --misbehave KIND`` (a hidden option) runs one.

    alter-downstream   relays the next hop's report with that hop's output hash changed, its signature kept
    forge-error        does not send the step on; reports, in the next hop's name, an error it never sent
    blame-next         does not send the step on; says the next hop could not be reached
    substitute-token   (last span) emits another token than the one it sampled; its logits stay honest
    ignore-constraints (last span) samples as if the session had no grammar and no logit_bias, while its receipt
                       commits to the parameters it was opened with
    close-others       with every step, also tries to close the session at ``target`` (another provider's)
    inject-step        with every step, also sends a step of its own into the session at ``target``
    replay-step        sends each step on twice, and relays the next hop's (honest, signed) refusal of the second
    garbage-report     answers every step with a report whose signature is nobody's
    stall              never answers a step
    silent-close       never answers a close: it hopes the route's receipts wait for it
    inflate-receipt    signs a receipt for half as many positions again as it served
    inflate-positions  sends every decode step on with its position doubled, signing for what it sent: the hops
                       after it would sign receipts for more positions than the gateway sent
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
from worker.messages import Close, HopEntry, HopError, Open, Report, SignedReceipt, Step
from worker.sampling import Sampler, SamplingParams
from worker.server import HopServer
from worker.trust import ReceiptFields
from worker.wire import payload_sha256

log = logging.getLogger(__name__)

MISBEHAVIOURS = (
    "alter-downstream", "forge-error", "blame-next", "substitute-token", "ignore-constraints", "close-others",
    "inject-step",
    "replay-step", "garbage-report", "stall", "silent-close", "inflate-receipt", "inflate-positions",
)  # fmt: skip


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
        if self.misbehave == "ignore-constraints" and session is not None and session.sampler is not None:
            loose = {k: v for k, v in (request.sampling or {}).items() if k not in ("grammar", "logit_bias")}
            session.sampler = Sampler(
                SamplingParams.from_dict(loose)
            )  # session.sampling, signed, is unchanged
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
        if self.misbehave != "substitute-token" or "report" not in reply:
            return reply, logits, sha
        session = self._sessions[request.session]
        report = Report.from_json(reply["report"])
        if report.entry.token is None:
            return reply, logits, sha
        # Emits another token, and says so in its own entry (the gateway reads the token from it): the
        # transcript commits to what the client was sent, while the retained logits say something else.
        token = (report.entry.token + 1) % self.runtime.shard.vocab_size
        session.tokens[-1] = token
        entry = replace(report.entry, token=token)
        signed = Report.signed(self.keys.hop_report, entry, None, report.compute_ms)
        return {"report": signed.to_json()}, logits, sha


class _Silent(Exception):
    """Raised by a close that is never to be answered."""
