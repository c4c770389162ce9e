"""What a provider keeps for validators, on disk: every step's input and output, held for a time after the
session ends, whatever else arrives meanwhile.

A session is one append-only file, ``<session hex>.steps``: a JSON line naming the job, then each step's input
frame and output frame in the wire format (:mod:`worker.wire`), whose headers carry the session, the step and
the payload's sha256. When the session ends, ``<session hex>.closed`` records the wall-clock time, so the window
survives a restart. The data is deleted ``retention_s`` after that, never earlier.

Space is promised, not evicted. Opening a session reserves what it may write (its positions at most, each at
the widest input and output the span takes); it opens only if that fits in the budget beside what is on disk
and what other open sessions may still write. Otherwise the provider is busy: it turns new work away rather
than drop data a validator may still ask for, which would cost it its stake.

On start the directory is read back. A session without a ``.closed`` mark was open when the process stopped: it
counts as closed at the restart. Whatever follows the last whole step (a frame cut short, the zeros a power loss
leaves) is cut off: the gateway saw that step fail, so no receipt signs it. Writes are flushed to the operating
system at every step, which a crash of the process does not lose, and synced to the disk when the session
closes: a power loss may take an open session's steps with it, which no receipt has signed yet.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import BinaryIO

import torch

from worker.errors import ProviderBusy, SessionExists, UnknownSession, WireError
from worker.wire import HEADER_SIZE, Frame, FrameLimits, decode_frame, encode_frame_parts, read_header

log = logging.getLogger(__name__)

STEPS = ".steps"
CLOSED = ".closed"
_NO_LIMITS = FrameLimits(max_payload_bytes=1 << 40, max_elements=1 << 40)  # the provider's own frames


@dataclass(frozen=True)
class KeptStep:
    """Where one step's frames lie in its session's file, and their digests."""

    step: int
    positions: int  # the input's (its dim 1)
    input_offset: int
    input_hash: bytes
    output_offset: int
    output_hash: bytes


@dataclass
class RetainedSession:
    id: bytes
    job: bytes  # the job ticket's id: whoever fetches the steps must name the same job
    path: Path
    reserved: int  # bytes this session may write while open; 0 once closed
    size: int = 0  # bytes on disk
    steps: list[KeptStep] = field(default_factory=list)
    closed_at: float | None = None  # wall-clock seconds


class RetentionStore:
    """Sessions' steps under ``directory``, at most ``budget_bytes`` of them, each kept ``retention_s`` after it
    closes. Not thread-safe: the runtime that owns it serialises calls."""

    def __init__(
        self,
        directory: Path | None,
        *,
        budget_bytes: int,
        retention_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._temporary = directory is None  # an in-process runtime's scratch space, gone when it is
        self.directory = Path(tempfile.mkdtemp(prefix="strata-retained-")) if directory is None else directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self.retention_s = retention_s
        self.clock = clock
        self._sessions: dict[bytes, RetainedSession] = {}
        self._files: dict[bytes, BinaryIO] = {}  # open sessions' append handles
        self._recover()

    def __del__(self) -> None:
        for handle in getattr(self, "_files", {}).values():
            handle.close()  # as a crash would leave them: the sessions are not marked closed
        if getattr(self, "_temporary", False):
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- sessions -------------------------------------------------------------------------------------------

    def begin(self, session_id: bytes, job: bytes, reserve: int) -> RetainedSession:
        if session_id in self._sessions:
            raise SessionExists(f"session {session_id.hex()} already exists")
        committed = self.committed_bytes
        if committed + reserve > self.budget_bytes:
            raise ProviderBusy(
                f"retained data and open sessions' reservations take {committed} bytes; a session here may "
                f"need {reserve} more and the budget is {self.budget_bytes}"
            )
        path = self.directory / (session_id.hex() + STEPS)
        handle = path.open("wb")
        head = json.dumps({"job": job.hex()}).encode() + b"\n"
        handle.write(head)
        handle.flush()
        session = RetainedSession(session_id, job, path, reserve, size=len(head))
        self._sessions[session_id] = session
        self._files[session_id] = handle
        return session

    def append(
        self,
        session_id: bytes,
        step: int,
        kept: tuple[tuple[torch.Tensor, bytes], tuple[torch.Tensor, bytes]],
    ) -> KeptStep:
        """Writes one step's input and output (``kept``: each a tensor and its payload's sha256) to the session's
        file, flushed: a crash of this process loses nothing that was answered."""
        session = self._sessions[session_id]
        handle = self._files[session_id]
        offsets = []
        for tensor, digest in kept:
            header, payload = encode_frame_parts(tensor, session=session_id, step=step, sha256=digest)
            offsets.append(session.size)
            handle.write(header)
            handle.write(payload)
            session.size += len(header) + payload.nbytes
        handle.flush()
        kept_step = KeptStep(step, int(kept[0][0].shape[1]), offsets[0], kept[0][1], offsets[1], kept[1][1])
        session.steps.append(kept_step)
        return kept_step

    def close(self, session_id: bytes) -> RetainedSession:
        session = self._sessions[session_id]
        handle = self._files.pop(session_id, None)
        if handle is not None:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        session.closed_at = self.clock()
        session.reserved = 0
        _write_closed(session.path, session.closed_at)
        return session

    def get(self, session_id: bytes) -> RetainedSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"no data kept for session {session_id.hex()}")
        return session

    def __contains__(self, session_id: bytes) -> bool:
        return session_id in self._sessions

    def read(self, session_id: bytes, step: int, part: str) -> Frame:
        """One kept step's ``input`` or ``output``, its digest checked against what was written."""
        session = self.get(session_id)
        kept = session.steps[step]
        offset = kept.input_offset if part == "input" else kept.output_offset
        with session.path.open("rb") as handle:
            handle.seek(offset)
            header = read_header(handle.read(HEADER_SIZE), limits=_NO_LIMITS)
            handle.seek(offset)
            return decode_frame(bytearray(handle.read(header.frame_bytes)), limits=_NO_LIMITS)

    def expire(self) -> list[bytes]:
        """Deletes the sessions closed more than ``retention_s`` ago; returns their ids."""
        now = self.clock()
        gone = [
            s.id
            for s in self._sessions.values()
            if s.closed_at is not None and now - s.closed_at > self.retention_s
        ]
        for session_id in gone:
            session = self._sessions.pop(session_id)
            session.path.unlink(missing_ok=True)
            _closed_mark(session.path).unlink(missing_ok=True)
        return gone

    @property
    def committed_bytes(self) -> int:
        """Bytes on disk, plus what open sessions may still write."""
        return sum(s.size + max(0, s.reserved - s.size) for s in self._sessions.values())

    @property
    def used_bytes(self) -> int:
        return sum(s.size for s in self._sessions.values())

    # -- restart --------------------------------------------------------------------------------------------

    def _recover(self) -> None:
        now = self.clock()
        for path in sorted(self.directory.glob("*" + STEPS)):
            mark = _closed_mark(path)
            try:
                # A session closed was synced to disk then; one open at the stop may hold anything past its
                # last flush (a power loss), so its payloads are checked too.
                session = _read_back(path, check_payloads=not mark.exists())
            except OSError as exc:  # unreadable now: left for the next start
                log.error("retained file %s cannot be read, left aside: %s", path, exc)
                continue
            except (ValueError, KeyError) as exc:  # not even the job it belongs to: nobody can use it
                log.warning("retained file %s does not say its job, deleted: %s", path, exc)
                path.unlink(missing_ok=True)
                _closed_mark(path).unlink(missing_ok=True)
                continue
            try:
                session.closed_at = float(json.loads(mark.read_text())["closedAt"])
            except (OSError, ValueError, KeyError, TypeError):
                session.closed_at = now  # open when the process stopped: its window starts now
                _write_closed(path, now)
            self._sessions[session.id] = session
        self.expire()


def _read_back(path: Path, *, check_payloads: bool) -> RetainedSession:
    session_id = bytes.fromhex(path.name.removesuffix(STEPS))
    with path.open("r+b") as handle:
        head = handle.readline()
        job = bytes.fromhex(json.loads(head)["job"])
        session = RetainedSession(session_id, job, path, reserved=0, size=len(head))
        for step, pair in enumerate(_frames_in_pairs(handle, session.size)):
            (input_offset, input_hash, positions), (output_offset, output_hash, _), end = pair
            if check_payloads and not _whole(handle, input_offset, output_offset, end):
                break
            session.steps.append(
                KeptStep(step, positions, input_offset, input_hash, output_offset, output_hash)
            )
            session.size = end
        handle.truncate(session.size)  # whatever follows the last whole step was never answered
    return session


def _whole(handle: BinaryIO, *offsets: int) -> bool:
    """Whether the frames between consecutive ``offsets`` decode, their payloads hashing to their headers."""
    for start, end in pairwise(offsets):
        handle.seek(start)
        try:
            decode_frame(bytearray(handle.read(end - start)), limits=_NO_LIMITS)
        except WireError:
            return False
    return True


def _frames_in_pairs(
    handle: BinaryIO, offset: int
) -> Iterator[tuple[tuple[int, bytes, int], tuple[int, bytes, int], int]]:
    """(input offset, digest and positions, the same of the output, end) of each whole step from ``offset`` on.
    Digests are taken from the headers: the payloads are hashed again whenever they are read."""
    while True:
        found = []
        for _ in range(2):
            handle.seek(offset)
            raw = handle.read(HEADER_SIZE)
            if len(raw) < HEADER_SIZE:
                return
            try:
                header = read_header(raw, limits=_NO_LIMITS)
            except WireError:  # what a crash left past the last whole write (zeros, a torn header)
                return
            end = offset + header.frame_bytes
            handle.seek(0, os.SEEK_END)
            if handle.tell() < end:
                return
            found.append((offset, header.sha256, header.shape[1] if len(header.shape) > 1 else 0))
            offset = end
        yield found[0], found[1], offset


def _closed_mark(path: Path) -> Path:
    return path.with_suffix(CLOSED)


def _write_closed(path: Path, closed_at: float) -> None:
    mark = _closed_mark(path)
    partial = mark.with_suffix(".partial")
    partial.write_text(json.dumps({"closedAt": closed_at}))
    os.replace(partial, mark)
