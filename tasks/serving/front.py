"""The fixed address of `serve --follow`: a TCP relay on host:port in front of the scoring server of the
moment, so that a champion move never refuses a connection.

Without it the follower had to stop the old scoring server before the new one could take the port: for one
model load (seconds to minutes) every request and every /ping failed, and a lingering worker of the old
server could answer the new one's readiness probe. Now the new server starts on a free loopback port, is
ready (/ping answers) before anything is sent to it, then `switch` points new connections at it; connections
already open finish on the old server, which is stopped once they are closed (`drain`).

Bytes only, no HTTP parsing: a keep-alive connection stays on the server it was opened to, which closes it
when idle (uvicorn: 5 s); nothing is rewritten, so what the scoring server answers is what the client gets.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter

Backend = tuple[str, int]
CHUNK = 1 << 16


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (the scoring server of the next version binds it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class Front:
    """A relay listening on host:port (its own thread and event loop) to the backend set by `switch`."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.target: Backend | None = None
        self.open: Counter = Counter()  # open relayed connections per backend
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="serving-front")

    def __enter__(self) -> "Front":
        self._thread.start()
        # bound here, before any model loads: a taken port fails at once, naming it
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, self.host, self.port), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        async def close():
            self._server.close()
            await self._server.wait_closed()
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def switch(self, backend: Backend) -> Backend | None:
        """New connections go to `backend` from now on; returns the one they went to before."""
        old, self.target = self.target, backend
        return old

    def drain(self, backend: Backend, timeout: float = 60) -> bool:
        """Wait until no relayed connection to `backend` is open (True), or `timeout` s (False)."""
        deadline = time.time() + timeout
        while self.open[backend] > 0:
            if time.time() > deadline:
                return False
            time.sleep(0.1)
        return True

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = self.target
        if target is None:
            writer.close()
            return
        self.open[target] += 1
        up_w = None
        try:
            try:
                up_r, up_w = await asyncio.open_connection(*target)
            except OSError:
                return
            ask = asyncio.ensure_future(_pipe(reader, up_w))
            await _pipe(up_r, writer)  # the server's side ended (answered and closed): the connection is done
            ask.cancel()
        finally:
            self.open[target] -= 1
            for w in (writer, up_w):
                if w is not None:
                    w.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until src ends, then half-close dst (the other direction may still be answering)."""
    try:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        pass
