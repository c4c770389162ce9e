"""A slow link on loopback: a TCP proxy that holds every chunk for a fixed delay in each direction, for tests and
benchmarks of peers far apart (the kernel here has no ``tc netem``).

It adds latency, not a bandwidth limit: chunks are forwarded in order, each ``delay_s`` after it arrived, so a
request and its reply cost two delays. It runs its own event loop on a thread, so blocking callers (a validator,
a benchmark) and asyncio code alike can connect through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from types import TracebackType

from worker.client import parse_endpoint


class DelayProxy:
    def __init__(self, upstream: str, delay_s: float) -> None:
        self.upstream = parse_endpoint(upstream)
        self.delay_s = delay_s
        self.endpoint = ""  # host:port to connect to instead of ``upstream``, once started
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connection, "127.0.0.1", 0), self._loop
        ).result(10)
        self.endpoint = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            self._pipes.discard(task)
            return
        for end in (writer, up_writer):
            # Forwarded at once: Nagle's algorithm would hold a message's second write for the first's
            # acknowledgement (a delayed ACK away), latency that is the proxy's, not the link's.
            sock = end.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except asyncio.CancelledError:
            # Cancelled by _stop. Ended here rather than cancelled: asyncio's server reads a handler task's
            # exception when it is done, and a cancelled task's raises, which it logs as an error.
            pass
        finally:
            for end in (writer, up_writer):
                end.close()
                with contextlib.suppress(OSError):
                    await end.wait_closed()
            self._pipes.discard(task)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Forwards ``source`` to ``sink``, each chunk ``delay_s`` after it arrived."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            with contextlib.suppress(OSError):
                while chunk := await source.read(1 << 16):
                    queue.put_nowait((time.monotonic() + self.delay_s, chunk))
            queue.put_nowait((time.monotonic() + self.delay_s, b""))

        reading = asyncio.create_task(read())
        try:
            while True:
                due, chunk = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not chunk:
                    if sink.can_write_eof():
                        sink.write_eof()
                    return
                sink.write(chunk)
                await sink.drain()
        except OSError:
            return
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading


__all__ = ["DelayProxy"]
