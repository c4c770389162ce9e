"""The hop protocol's control messages: one frozen dataclass each, one JSON form, one hex convention.

Threat model
------------
Anyone may be malicious: any provider, any client, anyone on a network path. The gateway is trusted by the
clients it serves, but a provider trusts nothing the gateway says unless the gateway signed it; validators are
trusted to judge, and a provider lets only the validators it trusts read what it kept. What must hold whatever
the others do:

- A provider runs only work a trusted gateway signed for it (:class:`HopTicket`: its key, its span, one
  session, a short expiry, at most ``max_positions`` positions) and takes that session's steps only from the
  peer the ticket names as ``previous``, over a connection that peer authenticated with its key (:class:`Auth`),
  and sends them on only to the peer the ticket names as ``next``, whose certificate it pins.
- Only the gateway that opened a session may close it, and each provider hands its signed receipt to the
  gateway directly: no other provider can drop, alter or forge it, or end the session early.
- Every hop's account of a step (:class:`HopEntry`: the positions it received, its input and output hashes; on
  the last span the token it emitted) and every error it reports is signed by that hop's staked key
  (:class:`Report`): a relay cannot alter or forge a downstream hop's entry, or blame it falsely. Each relay
  checks the report it passes on and signs over it, so a report that does not verify blames the hop that
  relayed it; and since a hop signs only for its own input, an error its input caused is the word of one hop
  against the one before.
- A validator reads a provider's retained data only with a ticket naming that provider and that session
  (:class:`FetchTicket`), signed by a validator the provider trusts, sent over a connection that validator
  authenticated.
- Links are TLS; a peer's certificate is pinned by its fingerprint (from the provider's signed ask, or from
  the ticket); the client's key is proved over the pinned channel, bound to the server's certificate, so a
  relay in the middle cannot pass it on. Plain TCP is a development switch only.

Every message is a small JSON control part, at most one tensor frame after it (:mod:`worker.protocol`). Bytes
are ``0x``-prefixed lower-case hex; addresses are checksummed; integers are JSON numbers, never strings.
Parsing is strict: a missing, extra or mistyped field is a :class:`ProtocolError`, raised before anything else
is done with the message.

The order on a connection: the server speaks first (:class:`Hello`, a fresh challenge), the client answers with
:class:`Auth`, then requests and replies alternate, one reply per request, in order; except that a
:class:`Push` is one-way (no reply, so a sender never waits on a link for a step to come back), and a
:class:`Follow` turns the connection into the session's stream of step reports until the session ends.

The token ring
--------------
A session runs in one of two ways, chosen by the gateway in its tickets. As a chain (the last span's ticket names
no next peer) the gateway sends each :class:`Step` to the first hop, each hop forwards it and waits, and the reply
carries every hop's report back: 2n link crossings a token for n hops. As a ring (the last span's ticket names the
first hop as its next peer, and the first hop's ticket names the last as its previous) the gateway pushes only the
prefill: each hop computes a :class:`Push`, signs its entry over the report it received, and pushes the step on
without waiting; the last samples the token, pushes it straight to the first as the next step's input, with its
signed report in compact form (:meth:`Report.compact`, so the first can check that the token it consumes is the
one the last signed), and hands the step's whole report to the gateway's :class:`Follow` stream. n link crossings
a token, and the gateway is off the per-token path. The ring's trust properties:

- A hop takes a session's pushes only from the ticket's previous peer (or the opening gateway), strictly in step
  order: a replayed, skipped or foreign step is dropped before its frame is computed, and a connection that keeps
  sending them is hung up on.
- Each report nests the report its hop received with the step (the previous hop's; on the first hop, the last
  hop's compact report of the step before, whose token must be the frame's): the receiving hop checks it (signer,
  session, step, that its output hash is the frame's) before it signs over it. So the gateway, reading a step's
  report from the last hop down, blames a report that does not hold on the hop that signed over it, and a last hop
  that fed the first another token than it reported is caught by its own two signatures for one step.
- The ring runs at most the steps, and stops after the stop tokens, the gateway named in the last hop's
  :class:`Open` (signed by nobody else). A step that does not reach the gateway in time is accounted for hop by
  hop: the gateway asks each hop directly for its signed :class:`Account` of that step (its report, its error, or
  that it never received it) and blames from those, as for a chain.
- A stop decided at the gateway (a stop string, a client gone) is a :class:`Close` naming how many steps the
  gateway took: sessions end, and each receipt bills exactly those steps, whatever the ring computed before the
  close arrived. Those extra steps are retained but billed to nobody: the provider's cost of speculation, at most
  about one ring's round trip of steps.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from eth_utils.address import is_checksum_address

from worker.errors import ProtocolError
from worker.sampling import MAX_TOP_LOGPROBS, TokenLogprobs

ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"
SESSION_BYTES = 16
MAX_SAMPLING_KEYS = 32
MAX_ERROR_MESSAGE = 500
MAX_ENDPOINT = 255
MAX_STEP_BUDGET_MS = 600_000
MAX_STOP_TOKENS = 64


# -- field readers -----------------------------------------------------------------------------------------


def hex0x(raw: bytes) -> str:
    return "0x" + raw.hex()


def _bytes(data: Mapping[str, Any], name: str, size: int) -> bytes:
    value = data.get(name)
    if not isinstance(value, str) or not value.startswith("0x") or len(value) != 2 + 2 * size:
        raise ProtocolError(f"{name} must be {size} bytes of 0x-prefixed hex")
    try:
        return bytes.fromhex(value[2:])
    except ValueError as exc:
        raise ProtocolError(f"{name} is not hex") from exc


def _int(data: Mapping[str, Any], name: str, *, low: int = 0, high: int = 2**64 - 1) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"{name} must be an integer in {low}..{high}")
    return value


def _address(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or len(value) != 42 or not _checksummed(value):
        raise ProtocolError(f"{name} must be a checksummed address")
    return value


@functools.lru_cache(maxsize=4096)
def _checksummed(value: str) -> bool:
    # The same few addresses come back in every step's reports: keccak them once each.
    return bool(is_checksum_address(value))


def _string(data: Mapping[str, Any], name: str, limit: int) -> str:
    value = data.get(name)
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"{name} must be a string of at most {limit} characters")
    return value


def _object(data: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ProtocolError(f"{name} must be an object")
    return data


def _only(data: Mapping[str, Any], allowed: set[str], name: str) -> None:
    extra = set(data) - allowed
    if extra:
        raise ProtocolError(f"{name} has unknown fields {sorted(extra)}")


def canonical(data: Any) -> bytes:
    """The one serialisation that digests are computed over."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# -- the handshake -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """The server's first words on a connection: a fresh challenge, and the fingerprint of the certificate it
    presented (zero over plain TCP), which the client's :class:`Auth` must name."""

    challenge: bytes
    fingerprint: bytes

    def to_json(self) -> dict[str, Any]:
        return {"op": "hello", "challenge": hex0x(self.challenge), "fingerprint": hex0x(self.fingerprint)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Hello:
        _only(data, {"op", "challenge", "fingerprint"}, "hello")
        return cls(_bytes(data, "challenge", 32), _bytes(data, "fingerprint", 32))


@dataclass(frozen=True)
class Auth:
    """The client's key, proved by its signature of PeerAuth(challenge, the fingerprint it pinned)."""

    address: str
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        return {"op": "auth", "address": self.address, "signature": hex0x(self.signature)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Auth:
        _only(data, {"op", "address", "signature"}, "auth")
        return cls(_address(data, "address"), _bytes(data, "signature", 65))


# -- tickets -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HopTicket:
    """The gateway's signed permission for ``provider`` to serve ``session`` of ``job_id`` on its span; see
    settlement.eip712.HopTicket for the signed type. ``previous`` is the only peer whose steps it takes (the
    gateway, for the first span); ``next`` the only one it sends them on to (the zero address on the last)."""

    job_id: bytes
    session: bytes
    provider: str
    model_root: bytes
    layer_start: int
    layer_end: int
    previous: str
    next: str
    next_endpoint: str
    next_fingerprint: bytes
    max_positions: int
    expires_at: int
    signature: bytes

    @property
    def last(self) -> bool:
        return self.next == ZERO_ADDRESS

    def to_json(self) -> dict[str, Any]:
        return {
            "jobId": hex0x(self.job_id),
            "session": hex0x(self.session),
            "provider": self.provider,
            "modelRoot": hex0x(self.model_root),
            "layerStart": self.layer_start,
            "layerEnd": self.layer_end,
            "previous": self.previous,
            "next": self.next,
            "nextEndpoint": self.next_endpoint,
            "nextFingerprint": hex0x(self.next_fingerprint),
            "maxPositions": self.max_positions,
            "expiresAt": self.expires_at,
            "signature": hex0x(self.signature),
        }

    @classmethod
    def from_json(cls, data: Any) -> HopTicket:
        data = _object(data, "ticket")
        _only(data, set(cls._FIELDS), "ticket")
        ticket = cls(
            _bytes(data, "jobId", 32),
            _bytes(data, "session", SESSION_BYTES),
            _address(data, "provider"),
            _bytes(data, "modelRoot", 32),
            _int(data, "layerStart", high=2**32 - 1),
            _int(data, "layerEnd", high=2**32 - 1),
            _address(data, "previous"),
            _address(data, "next"),
            _string(data, "nextEndpoint", MAX_ENDPOINT),
            _bytes(data, "nextFingerprint", 32),
            _int(data, "maxPositions", low=1, high=2**32 - 1),
            _int(data, "expiresAt"),
            _bytes(data, "signature", 65),
        )
        if ticket.layer_start >= ticket.layer_end:
            raise ProtocolError("the ticket's span is empty")
        if ticket.last != (ticket.next_endpoint == ""):
            raise ProtocolError("a ticket names a next endpoint exactly when it names a next hop")
        return ticket

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "jobId", "session", "provider", "modelRoot", "layerStart", "layerEnd", "previous", "next",
        "nextEndpoint", "nextFingerprint", "maxPositions", "expiresAt", "signature",
    )  # fmt: skip


@dataclass(frozen=True)
class FetchTicket:
    """A validator's signed request to read what ``provider`` retained of ``session`` of ``job_id``."""

    job_id: bytes
    session: bytes
    provider: str
    expires_at: int
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "jobId": hex0x(self.job_id),
            "session": hex0x(self.session),
            "provider": self.provider,
            "expiresAt": self.expires_at,
            "signature": hex0x(self.signature),
        }

    @classmethod
    def from_json(cls, data: Any) -> FetchTicket:
        data = _object(data, "ticket")
        _only(data, {"jobId", "session", "provider", "expiresAt", "signature"}, "ticket")
        return cls(
            _bytes(data, "jobId", 32),
            _bytes(data, "session", SESSION_BYTES),
            _address(data, "provider"),
            _int(data, "expiresAt"),
            _bytes(data, "signature", 65),
        )


# -- requests ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RingOrder:
    """What the gateway tells the last hop of a ring session: run at most ``steps`` steps (the prefill
    included), and push no token on after one of ``stop`` was emitted."""

    steps: int
    stop: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "stop": list(self.stop)}

    @classmethod
    def from_json(cls, data: Any) -> RingOrder:
        data = _object(data, "ring")
        _only(data, {"steps", "stop"}, "ring")
        stop = data.get("stop", [])
        if (
            not isinstance(stop, list)
            or len(stop) > MAX_STOP_TOKENS
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in stop)
        ):
            raise ProtocolError(f"stop must be at most {MAX_STOP_TOKENS} token ids")
        return cls(_int(data, "steps", low=1, high=2**32 - 1), tuple(stop))


@dataclass(frozen=True)
class Open:
    """From the gateway, directly to each provider of a route: open the ticket's session. ``sampling`` is how
    the last span picks tokens; ``ring``, on the last span of a ring session, when the ring stops."""

    op: ClassVar[str] = "open"
    ticket: HopTicket
    sampling: dict[str, Any] | None = None
    ring: RingOrder | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"op": self.op, "ticket": self.ticket.to_json()}
        if self.sampling is not None:
            data["sampling"] = self.sampling
        if self.ring is not None:
            data["ring"] = self.ring.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Open:
        _only(data, {"op", "ticket", "sampling", "ring"}, "open")
        sampling = data.get("sampling")
        if sampling is not None:
            sampling = dict(_object(sampling, "sampling"))
            if len(sampling) > MAX_SAMPLING_KEYS:
                raise ProtocolError("sampling has too many fields")
        ring = RingOrder.from_json(data["ring"]) if "ring" in data else None
        return cls(HopTicket.from_json(data.get("ticket")), sampling, ring)


@dataclass(frozen=True)
class Step:
    """One step of a session: ``positions`` new positions, carried by the frame that follows (token ids on the
    first span, hidden states on the others). From the ticket's previous peer only.

    ``budget_ms`` is how long the sender waits for the reply. A hop gives the next one its own budget less what
    it spent and a margin for the way back, so the hop nearest a silent peer is the first to give up, and its
    report of whom it waited for arrives before anyone upstream gives up on it.
    """

    op: ClassVar[str] = "step"
    session: bytes
    step: int
    positions: int
    logits: bool = False  # the last span returns the last position's logits as the reply's frame
    budget_ms: int = 60_000

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "session": hex0x(self.session),
            "step": self.step,
            "positions": self.positions,
            "logits": self.logits,
            "budgetMs": self.budget_ms,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Step:
        _only(data, {"op", "session", "step", "positions", "logits", "budgetMs"}, "step")
        logits = data.get("logits", False)
        if not isinstance(logits, bool):
            raise ProtocolError("logits must be true or false")
        return cls(
            _bytes(data, "session", SESSION_BYTES),
            _int(data, "step", high=2**32 - 1),
            _int(data, "positions", low=1, high=2**32 - 1),
            logits,
            _int(data, "budgetMs", low=1, high=MAX_STEP_BUDGET_MS),
        )


@dataclass(frozen=True)
class Push:
    """One step of a ring session, one-way: ``positions`` new positions in the frame that follows, and
    ``report``, the report the sender signed for it (the previous hop's, over everything before it; on the first
    hop, the last hop's compact report of the step before, whose token is the frame). From the ticket's previous
    peer only, or without a report from the gateway that opened the session (the prefill). Nothing is answered:
    what became of the step is in the hop's :class:`Account`."""

    op: ClassVar[str] = "push"
    session: bytes
    step: int
    positions: int
    report: Mapping[str, Any] | None = None
    logits: bool = False  # the last span sends the last position's logits with the step's report

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "op": self.op,
            "session": hex0x(self.session),
            "step": self.step,
            "positions": self.positions,
        }
        if self.report is not None:
            data["report"] = self.report
        if self.logits:
            data["logits"] = True
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Push:
        _only(data, {"op", "session", "step", "positions", "report", "logits"}, "push")
        report = data.get("report")
        if report is not None and not isinstance(report, Mapping):
            raise ProtocolError("report must be a report")
        logits = data.get("logits", False)
        if not isinstance(logits, bool):
            raise ProtocolError("logits must be true or false")
        return cls(
            _bytes(data, "session", SESSION_BYTES),
            _int(data, "step", high=2**32 - 1),
            _int(data, "positions", low=1, high=2**32 - 1),
            report,
            logits,
        )


@dataclass(frozen=True)
class Follow:
    """From the gateway that opened a ring session, to its last hop, on a connection of its own: every step's
    whole report (with the logits frame when the step asked for it), in order, as ``{"ok": true, "report": …}``,
    from step 0 on, then ``{"ok": true, "end": true}`` once the session ends."""

    op: ClassVar[str] = "follow"
    session: bytes

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "session": hex0x(self.session)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Follow:
        _only(data, {"op", "session"}, "follow")
        return cls(_bytes(data, "session", SESSION_BYTES))


@dataclass(frozen=True)
class Account:
    """From the gateway that opened a session: this hop's signed account of ``step``, answered as
    ``{"ok": true, "report": …}`` (compact): its entry when it computed the step and sent it on, that entry with the
    error it stopped at, or an entry with only an error: ``not_received`` (the step never reached it in order) or
    ``in_progress`` (it has the step and has not finished it)."""

    op: ClassVar[str] = "account"
    session: bytes
    step: int

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "session": hex0x(self.session), "step": self.step}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Account:
        _only(data, {"op", "session", "step"}, "account")
        return cls(_bytes(data, "session", SESSION_BYTES), _int(data, "step", high=2**32 - 1))


@dataclass(frozen=True)
class Close:
    """From the gateway that opened the session: end it and sign a receipt. Closing again returns the same
    receipt, so the gateway may retry. ``steps``: the receipt bills the session's first ``steps`` steps only (the
    ones the gateway took, when a ring ran ahead of a stop); None, every step computed."""

    op: ClassVar[str] = "close"
    session: bytes
    steps: int | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"op": self.op, "session": hex0x(self.session)}
        if self.steps is not None:
            data["steps"] = self.steps
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Close:
        _only(data, {"op", "session", "steps"}, "close")
        steps = _int(data, "steps", high=2**32 - 1) if "steps" in data else None
        return cls(_bytes(data, "session", SESSION_BYTES), steps)


@dataclass(frozen=True)
class Fetch:
    """From a validator: the ``input`` or ``output`` of a session's retained steps from ``step`` on, as many
    consecutive ones as fit in one frame (:class:`Fetched` says which)."""

    op: ClassVar[str] = "fetch"
    ticket: FetchTicket
    step: int
    part: str

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "ticket": self.ticket.to_json(), "step": self.step, "part": self.part}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fetch:
        _only(data, {"op", "ticket", "step", "part"}, "fetch")
        part = data.get("part")
        if part not in ("input", "output"):
            raise ProtocolError('part must be "input" or "output"')
        return cls(FetchTicket.from_json(data.get("ticket")), _int(data, "step", high=2**32 - 1), str(part))


@dataclass(frozen=True)
class Prove:
    """From a gateway checking an ask: sign EndpointProof(challenge, provider, endpoint, fingerprint) with the
    staked key, over this connection, whose certificate is the one the ask names."""

    op: ClassVar[str] = "prove"
    challenge: bytes
    endpoint: str

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "challenge": hex0x(self.challenge), "endpoint": self.endpoint}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Prove:
        _only(data, {"op", "challenge", "endpoint"}, "prove")
        return cls(_bytes(data, "challenge", 32), _string(data, "endpoint", MAX_ENDPOINT))


Request = Open | Step | Push | Follow | Account | Close | Fetch | Prove
_REQUESTS: dict[str, Any] = {cls.op: cls for cls in (Open, Step, Push, Follow, Account, Close, Fetch, Prove)}


def parse_request(data: Mapping[str, Any]) -> Request:
    op = data.get("op")
    kind = _REQUESTS.get(op) if isinstance(op, str) else None
    if kind is None:
        raise ProtocolError(f"unknown op {op!r}")
    request: Request = kind.from_json(data)
    return request


# -- replies -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HopError:
    code: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_json(cls, data: Any) -> HopError:
        data = _object(data, "error")
        _only(data, {"code", "message"}, "error")
        return cls(_string(data, "code", 64), _string(data, "message", MAX_ERROR_MESSAGE))


@dataclass(frozen=True)
class HopEntry:
    """One hop's account of one step: how many positions it received, what it received and sent on (sha256 of
    the frames' payloads), on the last span the token it emitted, and the error it stopped at (with the hashes,
    when it got as far as computing and then could not send the step on)."""

    provider: str
    session: bytes
    step: int
    input: bytes | None = None
    output: bytes | None = None
    token: int | None = None
    error: HopError | None = None
    positions: int | None = None
    logprobs: TokenLogprobs | None = None  # the emitted token's, when the session's sampling asks for them

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"provider": self.provider, "session": hex0x(self.session), "step": self.step}
        if self.positions is not None:
            data["positions"] = self.positions
        if self.input is not None:
            data["in"] = hex0x(self.input)
        if self.output is not None:
            data["out"] = hex0x(self.output)
        if self.token is not None:
            data["token"] = self.token
        if self.error is not None:
            data["error"] = self.error.to_json()
        if self.logprobs is not None:
            data["logprobs"] = self.logprobs.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any) -> HopEntry:
        data = _object(data, "entry")
        _only(
            data,
            {"provider", "session", "step", "positions", "in", "out", "token", "error", "logprobs"},
            "entry",
        )
        logprobs = None
        if "logprobs" in data:
            if "token" not in data:
                raise ProtocolError("only an entry with a token carries logprobs")
            try:
                logprobs = TokenLogprobs.from_json(data["logprobs"], vocab_size=2**32, limit=MAX_TOP_LOGPROBS)
            except ValueError as exc:
                raise ProtocolError(f"entry.logprobs: {exc}") from exc
        entry = cls(
            _address(data, "provider"),
            _bytes(data, "session", SESSION_BYTES),
            _int(data, "step", high=2**32 - 1),
            _bytes(data, "in", 32) if "in" in data else None,
            _bytes(data, "out", 32) if "out" in data else None,
            _int(data, "token", high=2**32 - 1) if "token" in data else None,
            HopError.from_json(data["error"]) if "error" in data else None,
            _int(data, "positions", low=1, high=2**32 - 1) if "positions" in data else None,
            logprobs,
        )
        if entry.error is None and (entry.input is None or entry.output is None or entry.positions is None):
            raise ProtocolError("an entry without an error carries its positions and both hashes")
        return entry


@dataclass(frozen=True)
class Report:
    """A hop's entry for a step and the report it nests, signed by the hop's staked key over both
    (:class:`settlement.eip712.HopReport`: the entry's digest and the nested report's). On a chain the nested report
    is the one the next hop sent back; on a ring, the one the hop received with the step (the previous hop's; on the
    first hop, the last hop's compact report of the step before). ``compute_ms`` is telemetry: not signed, never
    billed or judged on.

    A hop checks the report it nests (its hop, session and step, and its signer: the ticket's next on a chain, its
    previous on a ring) before it signs over it, and passes it on as it came (``downstream``: its JSON, unparsed
    below that). So the gateway, reading a route's report hop by hop, blames a report that does not hold on the hop
    that signed over it (worker.client.RouteClient); and a hop's signed entry is evidence that anyone can check.

    The compact form (:meth:`compact`) carries the nested report's digest (``below``) in its place: the same
    signature still verifies, and what travels with a step does not grow with anything but the route.
    """

    entry: HopEntry
    signature: bytes
    downstream: Mapping[str, Any] | None = None
    compute_ms: float | None = None
    below: bytes | None = None  # the nested report's digest, when it is not carried

    @staticmethod
    def digests(
        entry: HopEntry, downstream: Mapping[str, Any] | None, below: bytes | None = None
    ) -> tuple[bytes, bytes]:
        if downstream is not None:
            below = hashlib.sha256(canonical(downstream)).digest()
        return hashlib.sha256(canonical(entry.to_json())).digest(), below or bytes(32)

    @classmethod
    def signed(
        cls,
        sign: Callable[[bytes, bytes], bytes],  # trust.Keys.hop_report
        entry: HopEntry,
        downstream: Mapping[str, Any] | None = None,
        compute_ms: float | None = None,
    ) -> Report:
        return cls(entry, sign(*cls.digests(entry, downstream)), downstream, compute_ms)

    def signer(self, recover: Callable[[bytes, bytes, bytes], str]) -> str | None:
        """Who signed it (``recover`` is trust.Checks.hop_report), or None when nobody can be recovered."""
        try:
            return recover(*self.digests(self.entry, self.downstream, self.below), self.signature)
        except ValueError:
            return None

    def compact(self) -> Report:
        """The same signed report with its nested report replaced by that report's digest."""
        if self.downstream is None:
            return Report(self.entry, self.signature, None, None, self.below)
        return Report(self.entry, self.signature, None, None, self.digests(self.entry, self.downstream)[1])

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"entry": self.entry.to_json(), "signature": hex0x(self.signature)}
        if self.downstream is not None:
            data["next"] = self.downstream
        elif self.below is not None:
            data["below"] = hex0x(self.below)
        if self.compute_ms is not None:
            data["computeMs"] = self.compute_ms
        return data

    @classmethod
    def from_json(cls, data: Any) -> Report:
        """This hop's report; the one below it stays JSON (see :meth:`below`)."""
        data = _object(data, "report")
        _only(data, {"entry", "signature", "next", "below", "computeMs"}, "report")
        compute = data.get("computeMs")
        if compute is not None and (not isinstance(compute, int | float) or isinstance(compute, bool)):
            raise ProtocolError("computeMs must be a number")
        downstream = data.get("next")
        if downstream is not None and not isinstance(downstream, Mapping):
            raise ProtocolError("next must be a report")
        if downstream is not None and "below" in data:
            raise ProtocolError("a report carries the report below it or its digest, not both")
        below = _bytes(data, "below", 32) if "below" in data else None
        return cls(
            HopEntry.from_json(data.get("entry")), _bytes(data, "signature", 65), downstream, compute, below
        )

    def nested(self) -> Report | None:
        """The nested report, parsed; raises ProtocolError when it is not one."""
        return Report.from_json(self.downstream) if self.downstream is not None else None


@dataclass(frozen=True)
class SignedReceipt:
    """A provider's HopReceipt (settlement.eip712.HopReceipt) and its signature."""

    job_id: bytes
    session: bytes
    gateway: str
    provider: str
    model_root: bytes
    layer_start: int
    layer_end: int
    positions: int
    transcript_root: bytes
    sampling_hash: bytes
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "jobId": hex0x(self.job_id),
            "session": hex0x(self.session),
            "gateway": self.gateway,
            "provider": self.provider,
            "modelRoot": hex0x(self.model_root),
            "layerStart": self.layer_start,
            "layerEnd": self.layer_end,
            "positions": self.positions,
            "transcriptRoot": hex0x(self.transcript_root),
            "samplingHash": hex0x(self.sampling_hash),
            "signature": hex0x(self.signature),
        }

    _FIELDS: ClassVar[set[str]] = {
        "jobId", "session", "gateway", "provider", "modelRoot", "layerStart", "layerEnd", "positions",
        "transcriptRoot", "samplingHash", "signature",
    }  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> SignedReceipt:
        data = _object(data, "receipt")
        _only(data, cls._FIELDS, "receipt")
        return cls(
            _bytes(data, "jobId", 32),
            _bytes(data, "session", SESSION_BYTES),
            _address(data, "gateway"),
            _address(data, "provider"),
            _bytes(data, "modelRoot", 32),
            _int(data, "layerStart", high=2**32 - 1),
            _int(data, "layerEnd", high=2**32 - 1),
            _int(data, "positions"),
            _bytes(data, "transcriptRoot", 32),
            _bytes(data, "samplingHash", 32),
            _bytes(data, "signature", 65),
        )


@dataclass(frozen=True)
class Fetched:
    """The reply to a :class:`Fetch`: the frame holds steps ``step`` to ``step + len(widths) - 1`` of the
    ``steps`` retained, joined along dim 1, step i taking ``widths[i]`` of it (a step's positions; one row of
    logits a step on the last span's output)."""

    step: int
    steps: int
    part: str
    widths: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "step": self.step,
            "steps": self.steps,
            "part": self.part,
            "widths": list(self.widths),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fetched:
        _only(data, {"ok", "step", "steps", "part", "widths"}, "fetch reply")
        part = data.get("part")
        if part not in ("input", "output"):
            raise ProtocolError('part must be "input" or "output"')
        step = _int(data, "step", high=2**32 - 1)
        steps = _int(data, "steps", low=1, high=2**32 - 1)
        widths = data.get("widths")
        if (
            not isinstance(widths, list)
            or not 1 <= len(widths) <= steps - step
            or not all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w < 2**32 for w in widths)
        ):
            raise ProtocolError(f"widths must be 1 to {max(steps - step, 0)} positive integers")
        return cls(step, steps, str(part), tuple(widths))


def refusal(code: str, message: str) -> dict[str, Any]:
    """The reply to a request this server will not serve."""
    return {"ok": False, "error": HopError(code, message[:MAX_ERROR_MESSAGE]).to_json()}


def checked(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """A reply that says ``ok``; a refusal raises HopRefused with the server's code."""
    from worker.errors import HopRefused

    if data.get("ok") is True:
        return data
    if data.get("ok") is False and "error" in data:
        error = HopError.from_json(data["error"])
        raise HopRefused(error.code, error.message)
    raise ProtocolError("a reply must say ok: true, or carry an error")
