"""A TCP proxy on loopback that can drop into a network partition and out again.

One process's connections to a node go through it (shardd's ``node_addresses``), the
others' go straight to the node, so cutting it is a partition one side sees only.
While cut it is a black hole: connections are accepted and bytes read, but nothing is
passed on either way (a silent network, not a refused port), so whoever is on the far
side waits until its own timeouts end the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.harness.cluster import free_port_block


class Proxy:
    def __init__(self) -> None:
        self.port = free_port_block(1)
        self.target: int | None = None  # the node's port; connections wait until it is set
        self._cut = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._started.wait(timeout=10):
            raise RuntimeError("the proxy did not start")

    def cut(self) -> None:
        """Partition: pass nothing on, in either direction, on any connection."""
        self._cut.set()

    def mend(self) -> None:
        """End the partition: connections opened from now on work again; those that
        lived through it are closed (their bytes were lost)."""
        asyncio.run_coroutine_threadsafe(self._close_all(), self._loop).result(timeout=10)
        self._cut.clear()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close_all(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", self.port)
        )
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _close_all(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while self.target is None or self._cut.is_set():
                if writer.is_closing():
                    return
                await asyncio.sleep(0.05)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            self._writers.add(up_writer)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except OSError:
            pass
        finally:
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self._cut.is_set():
                    continue  # the partition swallows it
                writer.write(data)
                await writer.drain()
        writer.close()
