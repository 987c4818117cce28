"""The least a Python relay can do per message: a reference for bench/filter_throughput.py.

    .venv/bin/python bench/minimal_relay.py LISTEN_PORT NEXT_HOP_PORT

One asyncio protocol on uvloop, on 127.0.0.1, that answers smtp-source's commands and
relays each message to the next hop (MAIL, RCPT and DATA pipelined, then the message) on
one connection per session. No checks, no limits, no timeouts, no error handling: it only
shows what the event loop and the sockets cost on this machine, so that the worker's
figures can be read against the most any Python worker could reach here. Never use it
for mail.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class _NextHop(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.waiter: asyncio.Future[None] | None = None
        self.lines = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and self.buffer.count(b"\r\n") >= self.lines:
            self.waiter.set_result(None)
            self.waiter = None

    async def replies(self, lines: int) -> None:
        """Wait for `lines` reply lines (single-line replies only), then forget them."""
        if self.buffer.count(b"\r\n") < lines:
            self.lines = lines
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        self.buffer = b""


class _Session(asyncio.Protocol):
    def __init__(self, next_hop_port: int) -> None:
        self.next_hop_port = next_hop_port
        self.buffer = b""
        self.data: bytearray | None = None
        self.next_hop: _NextHop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"220 minimal ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.data is not None:
            self.data += data
            if self.data.endswith(b"\r\n.\r\n"):
                message, self.data = bytes(self.data), None
                asyncio.ensure_future(self.relay(message))
            return
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\r\n")
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.transport.write(b"250-minimal\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL":
                self.mail = line
                self.transport.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                self.rcpt = line
                self.transport.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                self.data = bytearray()
                self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                return
            elif verb == b"QUIT":
                self.transport.write(b"221 Bye\r\n")
                self.transport.close()
            else:
                self.transport.write(b"250 Ok\r\n")

    async def relay(self, message: bytes) -> None:
        if self.next_hop is None:
            loop = asyncio.get_running_loop()
            _, self.next_hop = await loop.create_connection(
                _NextHop, "127.0.0.1", self.next_hop_port
            )
            await self.next_hop.replies(1)
            # smtp-sink answers EHLO on several lines: HELO is enough here.
            self.next_hop.transport.write(b"HELO minimal\r\n")
            await self.next_hop.replies(1)
        hop = self.next_hop
        hop.transport.write(self.mail + b"\r\n" + self.rcpt + b"\r\nDATA\r\n")
        await hop.replies(3)
        hop.transport.write(b"Received: by minimal\r\n" + message)
        await hop.replies(1)
        self.transport.write(b"250 2.0.0 Ok\r\n")


async def main(port: int, next_hop_port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: _Session(next_hop_port), "127.0.0.1", port)
    print("minimal relay listening", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
