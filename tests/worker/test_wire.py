"""Tensor frames: exact round trips, the layout on the wire, and every way a frame is refused."""

from __future__ import annotations

import hashlib
import io
import struct
import uuid
from collections.abc import Callable

import pytest
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
    WireError,
    WireUnsupportedHost,
    WorkerError,
)
from worker.wire import (
    DTYPE_CODES,
    HEADER_SIZE,
    SUPPORTED_DTYPES,
    FrameLimits,
    decode_frame,
    decode_payload,
    encode_frame,
    encode_frame_parts,
    payload_sha256,
    read_header,
)

# The layout as documented in worker.wire, written out again so that a change to the module's format
# fails here instead of silently breaking providers that run the previous build.
LAYOUT = struct.Struct("<4sBBBB4I16sIIQ32s")
FIELDS = (
    "magic",
    "version",
    "dtype_code",
    "ndim",
    "reserved_byte",
    "dim0",
    "dim1",
    "dim2",
    "dim3",
    "session",
    "step",
    "reserved_word",
    "payload_bytes",
    "sha256",
)
DIM0_OFFSET = 8
SESSION = uuid.UUID("12345678-1234-5678-1234-567812345678").bytes
LIMITS = FrameLimits()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32]
SHAPES = [(7,), (3, 5), (1, 4, 8), (2, 3, 4, 5)]


def _sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, generator=generator, dtype=dtype)


def _frame(shape: tuple[int, ...] = (2, 3, 4), dtype: torch.dtype = torch.float32, step: int = 5) -> bytes:
    return encode_frame(_sample(shape, dtype), session=SESSION, step=step)


def _fields(frame: bytes) -> dict[str, object]:
    return dict(zip(FIELDS, LAYOUT.unpack_from(frame), strict=True))


def _with_header(frame: bytes, **changes: object) -> bytes:
    """The frame with some header fields replaced; the payload and its recorded digest stay as they were."""
    fields = {**_fields(frame), **changes}
    return LAYOUT.pack(*(fields[name] for name in FIELDS)) + frame[LAYOUT.size :]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that comparisons are exact (NaN payloads and -0.0 included)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.contiguous().view(ints[tensor.element_size()])


# --- round trips ------------------------------------------------------------------------------------


def test_layout_matches_documented_struct() -> None:
    assert LAYOUT.size == HEADER_SIZE == 88
    # Dtype codes are part of the format too: a peer on an older build must read the same numbers.
    assert dict(DTYPE_CODES) == {dtype: code for code, dtype in enumerate(DTYPES, start=1)}
    assert frozenset(DTYPES) == SUPPORTED_DTYPES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = _sample(shape, dtype)

    frame = decode_frame(encode_frame(tensor, session=SESSION, step=3), limits=LIMITS)

    assert frame.tensor.dtype == dtype
    assert tuple(frame.tensor.shape) == shape
    assert torch.equal(_bits(frame.tensor), _bits(tensor))


def test_bfloat16_every_bit_pattern_survives() -> None:
    # Every one of the 65,536 bfloat16 values, NaNs, infinities and subnormals included.
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).reshape(256, 256)
    tensor = bits.view(torch.bfloat16)

    frame = decode_frame(encode_frame(tensor, session=SESSION, step=0), limits=LIMITS)

    assert frame.tensor.dtype == torch.bfloat16
    assert torch.equal(frame.tensor.view(torch.int16), bits)


def test_payload_is_raw_little_endian_bytes_not_json_or_base64() -> None:
    tensor = torch.linspace(-1.0, 1.0, 1024, dtype=torch.float32).reshape(1, 1, 1024)

    data = encode_frame(tensor, session=SESSION, step=0)

    assert len(data) == HEADER_SIZE + 4096
    assert data[HEADER_SIZE:] == struct.pack("<1024f", *tensor.flatten().tolist())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frame_is_header_plus_exact_tensor_bytes(dtype: torch.dtype) -> None:
    tensor = _sample((2, 3, 4), dtype)

    data = encode_frame(tensor, session=SESSION, step=0)

    assert HEADER_SIZE < 128
    assert len(data) == HEADER_SIZE + tensor.numel() * tensor.element_size()


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.transpose(0, 1),
        lambda t: t.permute(2, 0, 1),
        lambda t: t[:, ::2, 1:],
        lambda t: t[:1].expand(3, 4, 6)[1:],
    ],
    ids=["transposed", "permuted", "strided-slice", "expanded"],
)
def test_non_contiguous_input_is_sent_contiguous(make: Callable[[torch.Tensor], torch.Tensor]) -> None:
    tensor = make(_sample((2, 4, 6), torch.float32))
    assert not tensor.is_contiguous()

    data = encode_frame(tensor, session=SESSION, step=1)
    frame = decode_frame(data, limits=LIMITS)

    assert frame.tensor.is_contiguous()
    assert torch.equal(frame.tensor, tensor)
    assert data[HEADER_SIZE:] == tensor.contiguous().numpy().tobytes()
    assert frame.sha256 == payload_sha256(tensor) == payload_sha256(tensor.contiguous())


@pytest.mark.parametrize("step", [0, 1, 4_096, 2**32 - 1])
def test_session_and_step_round_trip(step: int) -> None:
    session = uuid.uuid4().bytes

    frame = decode_frame(encode_frame(torch.ones(1, 8), session=session, step=step), limits=LIMITS)

    assert frame.session == session
    assert frame.step == step


def test_digest_is_sha256_of_the_wire_payload() -> None:
    tensor = _sample((2, 16), torch.bfloat16)

    data = encode_frame(tensor, session=SESSION, step=2)
    frame = decode_frame(data, limits=LIMITS)

    expected = hashlib.sha256(data[HEADER_SIZE:]).digest()
    assert payload_sha256(tensor) == frame.sha256 == _fields(data)["sha256"] == expected


def test_tensor_that_needs_grad_is_sent_without_its_history() -> None:
    tensor = torch.randn(2, 4, requires_grad=True)

    frame = decode_frame(encode_frame(tensor * 2, session=SESSION, step=0), limits=LIMITS)

    assert not frame.tensor.requires_grad
    assert torch.equal(frame.tensor, (tensor * 2).detach())


def test_parts_share_memory_with_a_contiguous_tensor() -> None:
    tensor = torch.zeros(4, dtype=torch.float32)

    header, payload = encode_frame_parts(tensor, session=SESSION, step=0)
    tensor[0] = 1.0

    # The documented contract: the payload is a view, not a copy, so it sees the write.
    assert len(header) == HEADER_SIZE
    assert payload.nbytes == 16
    assert bytes(payload[:4]) == struct.pack("<f", 1.0)


def test_decoding_a_bytearray_shares_its_memory() -> None:
    buffer = bytearray(_frame())

    frame = decode_frame(buffer, limits=LIMITS)
    frame.tensor.zero_()

    assert buffer[HEADER_SIZE:] == bytes(len(buffer) - HEADER_SIZE)


def test_decoding_bytes_copies_once_without_warning_and_leaves_them_alone() -> None:
    data = _frame()
    original = bytes(data)

    # pytest turns warnings into errors, so torch's warning about non-writable buffers would fail here.
    frame = decode_frame(data, limits=LIMITS)
    frame.tensor.add_(1.0)

    assert data == original


def test_decoding_a_read_only_memoryview() -> None:
    data = _frame(shape=(3, 3), dtype=torch.float16)

    frame = decode_frame(memoryview(data), limits=LIMITS)

    assert torch.equal(frame.tensor, _sample((3, 3), torch.float16))


def test_server_path_reads_header_then_exactly_the_payload() -> None:
    tensor = _sample((1, 5, 32), torch.bfloat16)
    stream = io.BytesIO(encode_frame(tensor, session=SESSION, step=9))

    header = read_header(stream.read(HEADER_SIZE), limits=LIMITS)
    payload = bytearray(header.payload_bytes)
    assert stream.readinto(payload) == header.payload_bytes
    frame = decode_payload(header, payload)

    assert stream.read() == b""
    assert header.frame_bytes == HEADER_SIZE + 320
    assert (header.dtype, header.shape, header.step) == (torch.bfloat16, (1, 5, 32), 9)
    assert torch.equal(_bits(frame.tensor), _bits(tensor))


# --- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (FrameTruncated, "frame_truncated"),
        (FrameTrailingBytes, "frame_trailing_bytes"),
        (FrameBadMagic, "frame_bad_magic"),
        (FrameUnsupportedVersion, "frame_unsupported_version"),
        (FrameBadReserved, "frame_bad_reserved"),
        (FrameBadDtype, "frame_bad_dtype"),
        (FrameBadShape, "frame_bad_shape"),
        (FrameLengthMismatch, "frame_length_mismatch"),
        (FrameTooLarge, "frame_too_large"),
        (FrameHashMismatch, "frame_hash_mismatch"),
        (FrameBadField, "frame_bad_field"),
        (FrameLimitsInvalid, "wire_bad_limits"),
        (WireUnsupportedHost, "wire_unsupported_host"),
    ],
)
def test_error_codes_are_stable(error: type[WireError], code: str) -> None:
    # Peers and the gateway match on these strings; renaming one is a protocol change.
    assert error.code == code
    assert issubclass(error, WireError)
    assert issubclass(error, WorkerError)


@pytest.mark.parametrize("length", [0, 1, HEADER_SIZE - 1])
def test_truncated_header(length: int) -> None:
    data = _frame()[:length]

    with pytest.raises(FrameTruncated, match=f"expected {HEADER_SIZE} bytes, got {length}") as caught:
        decode_frame(data, limits=LIMITS)
    assert caught.value.code == "frame_truncated"
    with pytest.raises(FrameTruncated):
        read_header(data, limits=LIMITS)


def test_truncated_payload() -> None:
    data = _frame(shape=(2, 3, 4))  # 96 payload bytes

    with pytest.raises(FrameTruncated, match="payload truncated: expected 96 bytes, got 95") as caught:
        decode_frame(data[:-1], limits=LIMITS)
    assert caught.value.code == "frame_truncated"


def test_header_alone_is_a_truncated_frame() -> None:
    with pytest.raises(FrameTruncated, match="got 0"):
        decode_frame(_frame()[:HEADER_SIZE], limits=LIMITS)


def test_trailing_bytes() -> None:
    data = _frame()

    with pytest.raises(FrameTrailingBytes, match="1 trailing bytes") as caught:
        decode_frame(data + b"\x00", limits=LIMITS)
    assert caught.value.code == "frame_trailing_bytes"


def test_two_frames_back_to_back_are_not_one_frame() -> None:
    with pytest.raises(FrameTrailingBytes):
        decode_frame(_frame() + _frame(), limits=LIMITS)


def test_bad_magic() -> None:
    data = _with_header(_frame(), magic=b"POST")

    with pytest.raises(FrameBadMagic, match="b'POST'") as caught:
        decode_frame(data, limits=LIMITS)
    assert caught.value.code == "frame_bad_magic"


def test_unknown_version() -> None:
    data = _with_header(_frame(), version=2)

    with pytest.raises(FrameUnsupportedVersion, match="version 2") as caught:
        decode_frame(data, limits=LIMITS)
    assert caught.value.code == "frame_unsupported_version"


@pytest.mark.parametrize("field", ["reserved_byte", "reserved_word"])
def test_reserved_fields_must_be_zero(field: str) -> None:
    with pytest.raises(FrameBadReserved, match="got 1") as caught:
        decode_frame(_with_header(_frame(), **{field: 1}), limits=LIMITS)
    assert caught.value.code == "frame_bad_reserved"


@pytest.mark.parametrize("dtype_code", [0, 7, 255])
def test_unknown_dtype_code(dtype_code: int) -> None:
    data = _with_header(_frame(), dtype_code=dtype_code)

    with pytest.raises(FrameBadDtype, match=f"code {dtype_code}: unknown dtype code") as caught:
        decode_frame(data, limits=LIMITS)
    assert caught.value.code == "frame_bad_dtype"


def test_dtype_the_receiver_does_not_allow() -> None:
    limits = FrameLimits(allowed_dtypes=frozenset({torch.float16, torch.bfloat16}))

    with pytest.raises(FrameBadDtype, match=r"torch\.float32: not allowed") as caught:
        read_header(_frame(dtype=torch.float32), limits=limits)
    assert caught.value.code == "frame_bad_dtype"


@pytest.mark.parametrize("ndim", [0, 5, 255])
def test_ndim_outside_the_format(ndim: int) -> None:
    data = _with_header(_frame(), ndim=ndim)

    with pytest.raises(FrameBadShape, match=f"ndim {ndim} is not between 1 and 4") as caught:
        decode_frame(data, limits=LIMITS)
    assert caught.value.code == "frame_bad_shape"


def test_ndim_over_the_receivers_limit() -> None:
    with pytest.raises(FrameBadShape, match="ndim 3 is not between 1 and 2"):
        decode_frame(_frame(shape=(2, 3, 4)), limits=FrameLimits(max_dims=2))


def test_zero_dim() -> None:
    data = _with_header(_frame(shape=(2, 3, 4)), dim1=0, payload_bytes=0)

    with pytest.raises(FrameBadShape, match=r"\(2, 0, 4\): every dim must be at least 1") as caught:
        decode_frame(data, limits=LIMITS)
    assert caught.value.code == "frame_bad_shape"


def test_value_in_an_unused_dim_slot() -> None:
    data = _with_header(_frame(shape=(2, 3, 4)), dim3=1)

    with pytest.raises(FrameBadShape, match="slots after the first 3 must be zero"):
        decode_frame(data, limits=LIMITS)


def test_element_count_disagrees_with_payload_length() -> None:
    # A (2, 3, 4) float32 tensor needs 96 bytes; the header claims 100 and 100 bytes follow.
    data = _with_header(_frame(shape=(2, 3, 4)), payload_bytes=100) + bytes(4)

    with pytest.raises(FrameLengthMismatch, match="needs 96 payload bytes, header declares 100") as caught:
        decode_frame(data, limits=LIMITS)
    assert caught.value.code == "frame_length_mismatch"


def test_flipped_bit_in_a_dim_is_caught() -> None:
    data = bytearray(_frame(shape=(4, 3, 2)))
    data[DIM0_OFFSET] ^= 0x01  # dim 0: 4 → 5

    with pytest.raises(FrameLengthMismatch, match=r"\(5, 3, 2\) of torch\.float32 needs 120"):
        decode_frame(data, limits=LIMITS)


def test_flipped_high_byte_in_a_dim_is_caught_as_too_large() -> None:
    data = bytearray(_frame(shape=(4, 3, 2)))
    data[DIM0_OFFSET + 3] ^= 0x80  # dim 0: 4 → 2**31 + 4 elements-worth

    with pytest.raises(FrameTooLarge, match="elements"):
        decode_frame(data, limits=LIMITS)


def test_flipped_payload_byte_is_a_hash_mismatch() -> None:
    data = bytearray(_frame())
    data[-1] ^= 0x01
    recorded = _fields(bytes(data))["sha256"]
    assert isinstance(recorded, bytes)

    with pytest.raises(FrameHashMismatch, match=recorded.hex()) as caught:
        decode_frame(data, limits=LIMITS)
    assert caught.value.code == "frame_hash_mismatch"


def test_flipped_digest_byte_is_a_hash_mismatch() -> None:
    data = bytearray(_frame())
    data[HEADER_SIZE - 1] ^= 0x01

    with pytest.raises(FrameHashMismatch):
        decode_frame(data, limits=LIMITS)


def test_oversized_payload_is_refused_before_it_is_read() -> None:
    # 1 MiB of float32 that the receiver, which takes at most 64 KiB, must not read.
    stream = io.BytesIO(encode_frame(torch.zeros(256, 1024), session=SESSION, step=0))
    limits = FrameLimits(max_payload_bytes=64 * 1024)

    with pytest.raises(FrameTooLarge, match="1048576 payload bytes, limit 65536") as caught:
        read_header(stream.read(HEADER_SIZE), limits=limits)
    assert caught.value.code == "frame_too_large"
    assert stream.tell() == HEADER_SIZE


def test_oversized_claim_in_a_bare_header_is_refused() -> None:
    # A peer may send a header that declares an enormous payload it never intends to send.
    header = _with_header(_frame(shape=(1, 1)), dim0=2**32 - 1, dim1=2**32 - 1, payload_bytes=2**64 - 4)

    with pytest.raises(FrameTooLarge, match="payload bytes"):
        read_header(header[:HEADER_SIZE], limits=LIMITS)


def test_too_many_elements() -> None:
    limits = FrameLimits(max_elements=23)

    with pytest.raises(FrameTooLarge, match="24 elements, limit 23"):
        read_header(_frame(shape=(2, 3, 4)), limits=limits)


def test_decode_payload_checks_the_payload_length() -> None:
    data = _frame(shape=(2, 3, 4))
    header = read_header(data, limits=LIMITS)

    with pytest.raises(FrameTruncated):
        decode_payload(header, bytearray(data[HEADER_SIZE:-4]))
    with pytest.raises(FrameTrailingBytes):
        decode_payload(header, bytearray(data[HEADER_SIZE:] + b"\x00"))


# --- what the encoder refuses -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.complex64, torch.float8_e4m3fn], ids=str)
def test_encoder_refuses_a_dtype_without_a_code(dtype: torch.dtype) -> None:
    tensor = torch.zeros(2, 2).to(dtype)

    with pytest.raises(FrameBadDtype, match="no wire code"):
        encode_frame(tensor, session=SESSION, step=0)
    with pytest.raises(FrameBadDtype):
        payload_sha256(tensor)


@pytest.mark.parametrize(
    ("shape", "reason"),
    [((), "ndim 0"), ((1, 1, 1, 1, 1), "ndim 5"), ((2, 0, 3), "at least 1")],
    ids=["scalar", "5-D", "empty"],
)
def test_encoder_refuses_a_shape_the_format_cannot_carry(shape: tuple[int, ...], reason: str) -> None:
    with pytest.raises(FrameBadShape, match=reason):
        encode_frame(torch.zeros(shape), session=SESSION, step=0)


@pytest.mark.parametrize("session", [b"", SESSION[:15], SESSION + b"\x00"])
def test_encoder_refuses_a_session_that_is_not_16_bytes(session: bytes) -> None:
    with pytest.raises(FrameBadField, match="exactly 16 bytes") as caught:
        encode_frame(torch.zeros(2), session=session, step=0)
    assert caught.value.code == "frame_bad_field"


@pytest.mark.parametrize("step", [-1, 2**32])
def test_encoder_refuses_a_step_outside_uint32(step: int) -> None:
    with pytest.raises(FrameBadField, match=f"step {step}"):
        encode_frame(torch.zeros(2), session=SESSION, step=step)


def test_encoder_refuses_a_sparse_tensor() -> None:
    with pytest.raises(FrameBadField, match="sparse"):
        encode_frame(torch.eye(3).to_sparse(), session=SESSION, step=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_payload_bytes": 0},
        {"max_dims": 0},
        {"max_dims": 5},
        {"max_elements": 0},
        {"allowed_dtypes": frozenset()},
        {"allowed_dtypes": frozenset({torch.complex64})},
    ],
    ids=["no-bytes", "no-dims", "dims-over-format", "no-elements", "no-dtypes", "unknown-dtype"],
)
def test_limits_that_cannot_be_enforced_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(FrameLimitsInvalid) as caught:
        FrameLimits(**kwargs)  # type: ignore[arg-type]
    assert caught.value.code == "wire_bad_limits"
