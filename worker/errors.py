"""Errors raised by the provider node.

    WorkerError                   every error below; carries a stable ``code``
    ├── CheckpointError           the checkpoint directory is missing files or tensors
    ├── ModelStructureError       the model's parts cannot be found or built
    ├── ModelIdentityError        weights or manifest do not match the model's hashes
    ├── SessionError              a step the runtime cannot run: busy, unknown session, out of order, bad input
    ├── TicketRefused             a ticket that is not valid here: unsigned, forged, expired, for someone else
    ├── ProtocolError             a hop message that does not follow the protocol
    ├── NotAuthorised             a request from a peer the session's ticket does not name
    ├── Unauthenticated           a client that did not prove its key on the connection
    ├── CertificateMismatch       a server that presented another certificate than the pinned one
    ├── HopRefused                a provider refused a direct request; ``code`` is the provider's
    ├── HopUnreachable            a provider could not be reached, or dropped the connection
    ├── StepFailed                a step did not come back whole; carries the route's report
    └── WireError                 a tensor frame that cannot be encoded or accepted (see worker.wire)
        ├── FrameTruncated            fewer bytes than the header, or than the payload it declares
        ├── FrameTrailingBytes        more bytes than the header declares
        ├── FrameBadMagic             not a Strata tensor frame
        ├── FrameUnsupportedVersion   a format version this node does not speak
        ├── FrameBadReserved          a reserved header field is not zero
        ├── FrameBadDtype             an unknown dtype code, or a dtype the receiver does not allow
        ├── FrameBadShape             no dims, too many, a zero dim, or a value in an unused dim slot
        ├── FrameLengthMismatch       shape × itemsize disagrees with the declared payload length
        ├── FrameTooLarge             payload bytes or elements over the receiver's limits
        ├── FrameHashMismatch         the payload does not hash to the header's sha256
        ├── FrameBadField             a session, step or tensor the format cannot carry (encoding)
        ├── FrameLimitsInvalid        FrameLimits that cannot be enforced
        └── WireUnsupportedHost       a big-endian host, which the little-endian format does not serve

The hop server turns these into error replies by ``code``.
"""

from __future__ import annotations

from typing import Any


class WorkerError(Exception):
    code = "worker_error"


class CheckpointError(WorkerError):
    code = "checkpoint_error"


class ModelStructureError(WorkerError):
    code = "model_structure_error"


class ModelIdentityError(WorkerError):
    code = "model_identity_mismatch"


class WireError(WorkerError):
    """A tensor frame that cannot be encoded or accepted; the subclass's ``code`` says which check failed."""

    code = "wire_error"


class FrameTruncated(WireError):
    code = "frame_truncated"

    def __init__(self, part: str, expected_bytes: int, got_bytes: int) -> None:
        self.part = part
        self.expected_bytes = expected_bytes
        self.got_bytes = got_bytes
        super().__init__(f"frame {part} truncated: expected {expected_bytes} bytes, got {got_bytes}")


class FrameTrailingBytes(WireError):
    code = "frame_trailing_bytes"

    def __init__(self, expected_bytes: int, got_bytes: int) -> None:
        self.expected_bytes = expected_bytes
        self.got_bytes = got_bytes
        super().__init__(
            f"frame has {got_bytes - expected_bytes} trailing bytes: "
            f"expected {expected_bytes} bytes, got {got_bytes}"
        )


class FrameBadMagic(WireError):
    code = "frame_bad_magic"

    def __init__(self, magic: bytes) -> None:
        self.magic = magic
        super().__init__(f"not a tensor frame: magic {magic!r}")


class FrameUnsupportedVersion(WireError):
    code = "frame_unsupported_version"

    def __init__(self, version: int, supported: int) -> None:
        self.version = version
        self.supported = supported
        super().__init__(f"frame format version {version} is not supported (this node speaks {supported})")


class FrameBadReserved(WireError):
    code = "frame_bad_reserved"

    def __init__(self, where: str, value: int) -> None:
        self.where = where
        self.value = value
        super().__init__(f"reserved header field at {where} must be zero, got {value}")


class FrameBadDtype(WireError):
    code = "frame_bad_dtype"

    def __init__(self, dtype: str, reason: str) -> None:
        self.dtype = dtype
        self.reason = reason
        super().__init__(f"dtype {dtype}: {reason}")


class FrameBadShape(WireError):
    code = "frame_bad_shape"

    def __init__(self, shape: tuple[int, ...], reason: str) -> None:
        self.shape = shape
        self.reason = reason
        super().__init__(f"shape {shape}: {reason}")


class FrameLengthMismatch(WireError):
    code = "frame_length_mismatch"

    def __init__(self, shape: tuple[int, ...], dtype: str, expected_bytes: int, declared_bytes: int) -> None:
        self.shape = shape
        self.dtype = dtype
        self.expected_bytes = expected_bytes
        self.declared_bytes = declared_bytes
        super().__init__(
            f"shape {shape} of {dtype} needs {expected_bytes} payload bytes, header declares {declared_bytes}"
        )


class FrameTooLarge(WireError):
    code = "frame_too_large"

    def __init__(self, what: str, value: int, limit: int) -> None:
        self.what = what
        self.value = value
        self.limit = limit
        super().__init__(f"frame too large: {value} {what}, limit {limit}")


class FrameHashMismatch(WireError):
    code = "frame_hash_mismatch"

    def __init__(self, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"payload sha256 {actual} does not match the header's {expected}")


class FrameBadField(WireError):
    code = "frame_bad_field"

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field} {value!r}: {reason}")


class FrameLimitsInvalid(WireError):
    code = "wire_bad_limits"

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"FrameLimits.{field} = {value!r}: {reason}")


class WireUnsupportedHost(WireError):
    code = "wire_unsupported_host"

    def __init__(self, byteorder: str) -> None:
        self.byteorder = byteorder
        super().__init__(f"tensor frames are little-endian; this host is {byteorder}-endian")


class SessionError(WorkerError):
    """A step that the runtime cannot run for this session; the subclass says why."""


class ProviderBusy(SessionError):
    """Refused to protect memory: too many sessions or cached tokens. The caller may retry or route elsewhere."""

    code = "provider_busy"


class UnknownSession(SessionError):
    code = "unknown_session"


class SessionExists(SessionError):
    code = "session_exists"


class StepOutOfOrder(SessionError):
    code = "step_out_of_order"

    def __init__(self, session: str, expected: int, got: int) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"session {session}: expected step {expected}, got {got}")


class BadStepInput(SessionError):
    code = "bad_step_input"


class TicketRefused(WorkerError):
    """A hop request without a valid job ticket: unsigned, forged, expired, or for another model."""

    code = "ticket_refused"


class ProtocolError(WorkerError):
    """A hop message that does not follow the protocol."""

    code = "bad_hop_message"


class NotAuthorised(WorkerError):
    """A request from a peer that may not make it: the session's ticket names another peer, or the peer is
    not the gateway or validator the request needs."""

    code = "not_authorised"


class Unauthenticated(WorkerError):
    """A connection whose client did not prove its key (or proved it for another server's certificate)."""

    code = "unauthenticated"


class CertificateMismatch(WorkerError):
    """The server presented another certificate than the one pinned for it."""

    code = "certificate_mismatch"


class HopRefused(WorkerError):
    """A provider refused a request made to it directly; ``code`` is the provider's."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{message} ({code})")


class HopUnreachable(WorkerError):
    """The next provider on the route could not be reached or dropped the connection."""

    code = "hop_unreachable"


class StepFailed(WorkerError):
    """A step (or a session's opening) did not come back whole; ``blame`` (worker.client.Blame) says which hops
    of the route it is on."""

    code = "step_failed"

    def __init__(self, message: str, blame: Any) -> None:
        self.blame = blame
        super().__init__(message)
