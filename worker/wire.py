"""Binary frames that carry one tensor (a hop's hidden states, or token ids) between providers.

A frame is a fixed 88-byte header followed by the tensor's raw bytes, C-contiguous and little-endian.
Nothing is JSON or base64: a (1, 1, 4096) float16 hidden state is 88 + 8,192 bytes on the wire.

Header, ``struct`` format ``<4sBBBB4I16sIIQ32s``, every integer little-endian:

    offset  size  field
         0     4  magic              b"STRF"
         4     1  version            uint8, FORMAT_VERSION (1)
         5     1  dtype code         uint8, see DTYPE_CODES (float32 1, float16 2, bfloat16 3, float64 4,
                                     int64 5, int32 6)
         6     1  ndim               uint8, 1..4
         7     1  reserved           uint8, zero
         8    16  dims               4 × uint32; dims[:ndim] > 0, unused slots zero
        24    16  session            16 bytes, e.g. ``uuid.UUID(...).bytes``
        40     4  step               uint32, decode step index; 0 = prefill
        44     4  reserved           uint32, zero
        48     8  payload length     uint64, bytes that follow the header
        56    32  payload sha256     sha256 of exactly those bytes
        88        payload

The dims have fixed slots so that the header has one size: a server reads HEADER_SIZE bytes, calls
``read_header`` (which checks the receiver's ``FrameLimits``, so an oversized frame is refused before its
payload is read), reads ``payload_bytes`` more, and calls ``decode_payload``. ``decode_frame`` does both
on a buffer that holds the whole frame. The header is a multiple of 8 bytes so a payload that follows it
in one buffer stays aligned for every dtype.

The sha256 covers the payload only, because it is the value each hop records as its (input hash, output
hash) in its transcript; ``payload_sha256`` gives the same digest for a tensor without framing it. The
header itself is not hashed. A corrupted shape or dtype is caught by the length check only when it changes
shape × itemsize (float16 ↔ bfloat16, or another shape with the same element count, passes), and a
corrupted session or step is not caught here at all; whatever must be tamper-evident about them has to be
bound by the layer that carries the frame.

Hosts must be little-endian (x86-64 and ARM64 are); tensors are sent in native byte order and a
big-endian host is refused rather than byte-swapped.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from dataclasses import dataclass
from math import prod
from typing import Final, TypeAlias

import torch

from worker.errors import (
    FrameBadDtype,
    FrameBadField,
    FrameBadMagic,
    FrameBadReserved,
    FrameBadShape,
    FrameHashMismatch,
    FrameLengthMismatch,
    FrameLimitsInvalid,
    FrameTooLarge,
    FrameTrailingBytes,
    FrameTruncated,
    FrameUnsupportedVersion,
    WireUnsupportedHost,
)

__all__ = [
    "DTYPE_CODES",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_DIMS",
    "SESSION_BYTES",
    "SUPPORTED_DTYPES",
    "Frame",
    "FrameHeader",
    "FrameLimits",
    "decode_frame",
    "decode_payload",
    "encode_frame",
    "encode_frame_parts",
    "payload_sha256",
    "read_header",
]

Buffer: TypeAlias = bytes | bytearray | memoryview

MAGIC: Final = b"STRF"
FORMAT_VERSION: Final = 1
MAX_DIMS: Final = 4
SESSION_BYTES: Final = 16
_UINT32_MAX: Final = 2**32 - 1

# Codes are part of the format: never renumber one, only add. 0 stays unused so a zeroed header fails.
DTYPE_CODES: Final[dict[torch.dtype, int]] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.int64: 5,
    torch.int32: 6,
}
_DTYPES_BY_CODE: Final[dict[int, torch.dtype]] = {code: dtype for dtype, code in DTYPE_CODES.items()}
SUPPORTED_DTYPES: Final[frozenset[torch.dtype]] = frozenset(DTYPE_CODES)

_HEADER: Final = struct.Struct("<4sBBBB4I16sIIQ32s")
HEADER_SIZE: Final = _HEADER.size


@dataclass(frozen=True)
class FrameLimits:
    """What a receiver accepts; ``read_header`` checks these before any payload byte is read.

    The defaults fit a prefill of 8,192 tokens of an 8,192-wide model in float16 (128 MiB) with room to
    spare; a server should size them to the models it serves.
    """

    max_payload_bytes: int = 256 * 2**20  # bytes after the header
    max_dims: int = MAX_DIMS  # tensor rank, 1..MAX_DIMS
    # Elements, whatever their dtype. 2-byte dtypes are the smallest we carry, so this matches
    # max_payload_bytes for float16 and bfloat16.
    max_elements: int = 128 * 2**20
    allowed_dtypes: frozenset[torch.dtype] = SUPPORTED_DTYPES

    def __post_init__(self) -> None:
        if self.max_payload_bytes < 1:
            raise FrameLimitsInvalid("max_payload_bytes", self.max_payload_bytes, "must be at least 1")
        if not 1 <= self.max_dims <= MAX_DIMS:
            raise FrameLimitsInvalid("max_dims", self.max_dims, f"must be between 1 and {MAX_DIMS}")
        if self.max_elements < 1:
            raise FrameLimitsInvalid("max_elements", self.max_elements, "must be at least 1")
        unknown = self.allowed_dtypes - SUPPORTED_DTYPES
        if not self.allowed_dtypes or unknown:
            raise FrameLimitsInvalid(
                "allowed_dtypes",
                sorted(str(dtype) for dtype in self.allowed_dtypes),
                f"must be a non-empty subset of {sorted(str(dtype) for dtype in SUPPORTED_DTYPES)}",
            )


@dataclass(frozen=True)
class FrameHeader:
    """A header that ``read_header`` has checked against a receiver's limits."""

    version: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    session: bytes  # SESSION_BYTES bytes
    step: int  # decode step index; 0 = prefill
    payload_bytes: int  # bytes that follow the header
    sha256: bytes  # digest of the payload

    @property
    def frame_bytes(self) -> int:
        return HEADER_SIZE + self.payload_bytes


# eq=False: dataclass equality would compare tensors with ==, which is elementwise and has no truth value.
@dataclass(frozen=True, eq=False)
class Frame:
    tensor: torch.Tensor
    session: bytes  # SESSION_BYTES bytes
    step: int  # decode step index; 0 = prefill
    sha256: bytes  # digest of the payload as received, equal to payload_sha256(tensor)


def payload_sha256(tensor: torch.Tensor) -> bytes:
    """The sha256 of the bytes ``encode_frame`` would put on the wire for ``tensor``."""
    return hashlib.sha256(_payload_view(tensor)).digest()


def encode_frame_parts(
    tensor: torch.Tensor, *, session: bytes, step: int, sha256: bytes | None = None
) -> tuple[bytes, memoryview]:
    """The header and a view of the payload, for writers that send both without joining them. ``sha256`` is
    the payload's digest (``payload_sha256(tensor)``) when the caller computed it already.

    The payload view shares memory with ``tensor`` whenever it is already a contiguous CPU tensor, so the
    tensor must not be modified in place until the view has been written out: the header's digest was
    taken over the bytes as they were at this call.
    """
    _require_little_endian_host()
    if len(session) != SESSION_BYTES:
        raise FrameBadField("session", session.hex(), f"must be exactly {SESSION_BYTES} bytes")
    if not 0 <= step <= _UINT32_MAX:
        raise FrameBadField("step", step, f"must be between 0 and {_UINT32_MAX}")
    payload = _payload_view(tensor)
    dims = (*tensor.shape, *(0,) * (MAX_DIMS - tensor.dim()))
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        DTYPE_CODES[tensor.dtype],
        tensor.dim(),
        0,
        *dims,
        session,
        step,
        0,
        payload.nbytes,
        sha256 if sha256 is not None else hashlib.sha256(payload).digest(),
    )
    return header, payload


def encode_frame(tensor: torch.Tensor, *, session: bytes, step: int) -> bytes:
    """One frame in one ``bytes``: the header, then the tensor's bytes (copied once, by the join)."""
    header, payload = encode_frame_parts(tensor, session=session, step=step)
    return b"".join((header, payload))


def read_header(buffer: Buffer, *, limits: FrameLimits) -> FrameHeader:
    """Parse and check the header at the start of ``buffer``; bytes after HEADER_SIZE are not looked at.

    Everything the header alone can show is checked here, including the payload length against
    ``limits``, so a server can refuse a frame before reading its payload.
    """
    _require_little_endian_host()
    # As bytes, so that len() counts bytes even for a memoryview of wider items.
    view = memoryview(buffer).cast("B")
    if len(view) < HEADER_SIZE:
        raise FrameTruncated("header", HEADER_SIZE, len(view))
    (
        magic,
        version,
        dtype_code,
        ndim,
        reserved_byte,
        *dims,
        session,
        step,
        reserved_word,
        payload_bytes,
        digest,
    ) = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise FrameBadMagic(magic)
    if version != FORMAT_VERSION:
        raise FrameUnsupportedVersion(version, FORMAT_VERSION)
    if reserved_byte != 0:
        raise FrameBadReserved("byte 7", reserved_byte)
    if reserved_word != 0:
        raise FrameBadReserved("bytes 44..47", reserved_word)

    dtype = _DTYPES_BY_CODE.get(dtype_code)
    if dtype is None:
        raise FrameBadDtype(f"code {dtype_code}", "unknown dtype code")
    if dtype not in limits.allowed_dtypes:
        raise FrameBadDtype(str(dtype), "not allowed by this receiver")

    shape = tuple(dims[:ndim])
    if not 1 <= ndim <= limits.max_dims:
        raise FrameBadShape(tuple(dims), f"ndim {ndim} is not between 1 and {limits.max_dims}")
    if any(dim == 0 for dim in shape):
        raise FrameBadShape(shape, "every dim must be at least 1")
    if any(dims[ndim:]):
        raise FrameBadShape(tuple(dims), f"dim slots after the first {ndim} must be zero")

    if payload_bytes > limits.max_payload_bytes:
        raise FrameTooLarge("payload bytes", payload_bytes, limits.max_payload_bytes)
    elements = prod(shape)
    if elements > limits.max_elements:
        raise FrameTooLarge("elements", elements, limits.max_elements)
    if elements * dtype.itemsize != payload_bytes:
        raise FrameLengthMismatch(shape, str(dtype), elements * dtype.itemsize, payload_bytes)

    return FrameHeader(
        version=version,
        dtype=dtype,
        shape=shape,
        session=session,
        step=step,
        payload_bytes=payload_bytes,
        sha256=digest,
    )


def decode_payload(header: FrameHeader, payload: Buffer) -> Frame:
    """The frame whose header ``read_header`` returned, given exactly its payload bytes.

    A writable payload (a ``bytearray`` the server read into, or a writable memoryview of one) becomes the
    tensor's memory without a copy, so the caller must not reuse that buffer while the tensor lives. A
    read-only one (``bytes``) is copied once, see ``_tensor_from``.
    """
    view = memoryview(payload).cast("B")
    if view.nbytes < header.payload_bytes:
        raise FrameTruncated("payload", header.payload_bytes, view.nbytes)
    if view.nbytes > header.payload_bytes:
        raise FrameTrailingBytes(header.frame_bytes, HEADER_SIZE + view.nbytes)
    digest = hashlib.sha256(view).digest()
    if digest != header.sha256:
        raise FrameHashMismatch(header.sha256.hex(), digest.hex())
    return Frame(tensor=_tensor_from(view, header), session=header.session, step=header.step, sha256=digest)


def decode_frame(data: Buffer, *, limits: FrameLimits) -> Frame:
    """Check and decode one whole frame: exactly a header and the payload it declares."""
    header = read_header(data, limits=limits)
    view = memoryview(data).cast("B")
    # Slicing a memoryview shares memory, so a writable ``data`` still reaches torch without a copy.
    return decode_payload(header, view[HEADER_SIZE:])


def _payload_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's wire bytes: C-contiguous, on the CPU, as a flat byte view (no copy when it can)."""
    _require_little_endian_host()
    if tensor.layout != torch.strided:
        raise FrameBadField("tensor", str(tensor.layout), "must be a dense (strided) tensor")
    if tensor.dtype not in DTYPE_CODES:
        raise FrameBadDtype(str(tensor.dtype), "no wire code for this dtype")
    shape = tuple(tensor.shape)
    if not 1 <= len(shape) <= MAX_DIMS:
        raise FrameBadShape(shape, f"ndim {len(shape)} is not between 1 and {MAX_DIMS}")
    if any(dim == 0 for dim in shape):
        raise FrameBadShape(shape, "every dim must be at least 1")
    if any(dim > _UINT32_MAX for dim in shape):
        raise FrameBadShape(shape, f"every dim must be at most {_UINT32_MAX}")
    # contiguous() before cpu(): a strided GPU tensor is packed on the device, then crosses once.
    # Both are no-ops for a contiguous CPU tensor. detach() because autograd history stays on this host.
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    # Viewing as bytes lets numpy (whose buffer protocol we borrow) carry bfloat16, which it has no type
    # for; the bytes are the same raw 2-byte values a view as int16 would give.
    # ndarray.data is a memoryview that keeps the array, and through it the tensor, alive.
    return flat.view(torch.uint8).numpy().data


def _tensor_from(view: memoryview, header: FrameHeader) -> torch.Tensor:
    if view.readonly:
        # torch has no read-only tensors: one built over immutable bytes could change a ``bytes`` object
        # through an in-place op, and torch.frombuffer warns about exactly that. Copying into a bytearray
        # once gives the tensor memory of its own; it is the only copy on the decode path.
        view = memoryview(bytearray(view))
    # torch.frombuffer keeps a reference to the buffer, so the memory outlives this function.
    return torch.frombuffer(view, dtype=header.dtype).view(header.shape)


def _require_little_endian_host() -> None:
    if sys.byteorder != "little":
        raise WireUnsupportedHost(sys.byteorder)
