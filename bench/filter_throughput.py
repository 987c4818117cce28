"""Messages a second through the filter worker, against sending straight to the next hop.

    .venv/bin/python bench/filter_throughput.py [--messages 500] [--clients 4] [--size 20000]

Starts an aiosmtpd next hop and a worker (both on loopback, ephemeral ports) in this
process, then sends the same messages from CLIENTS parallel smtplib sessions twice: once
straight to the next hop (the baseline) and once through the worker. Prints both rates and
their ratio; the worker's cost is what the ratio is below 1.
"""

from __future__ import annotations

import argparse
import asyncio
import smtplib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiosmtpd.smtp import SMTP  # noqa: E402

from mailfilter.config import FilterConfig  # noqa: E402
from mailfilter.server import FilterServer, ServerThread  # noqa: E402


class CountingHandler:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        return "250 2.0.0 Ok"


class Sink:
    def __init__(self, handler: CountingHandler) -> None:
        self.handler = handler
        self.sessions: list[SMTP] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def factory():
            session = SMTP(self.handler, hostname="sink", enable_SMTPUTF8=True, loop=loop)
            self.sessions.append(session)
            return session

        self.server = await loop.create_server(factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()
        for session in self.sessions:
            if session.transport is not None:
                session.transport.close()
        await self.server.wait_closed()


class NoQuarantine:
    async def write(self, **kwargs) -> str:
        raise RuntimeError("the benchmark passes every message")


def _send(port: int, count: int, message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        for _ in range(count):
            client.sendmail("bench@remote.example", ["user@example.test"], message)


def _rate(port: int, messages: int, clients: int, message: bytes) -> float:
    share = messages // clients
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(_send, port, share, message) for _ in range(clients)]:
            future.result()
    return share * clients / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size", type=int, default=20_000)
    args = parser.parse_args()
    line = b"x" * 76 + b"\r\n"
    message = b"Subject: bench\r\n\r\n" + line * max(1, args.size // len(line))

    handler = CountingHandler()
    sink_thread = ServerThread(lambda: Sink(handler))
    sink = sink_thread.start()
    config = FilterConfig(
        listen_port=0, next_hop_port=sink.port, hostname="filter.bench",
        max_clients=args.clients * 2, max_per_ip=0,
    )
    filter_thread = ServerThread(lambda: FilterServer(config, sink=NoQuarantine()))
    worker = filter_thread.start()
    try:
        baseline = _rate(sink.port, args.messages, args.clients, message)
        through = _rate(worker.port, args.messages, args.clients, message)
    finally:
        filter_thread.stop()
        sink_thread.stop()
    print(f"messages of {len(message)} octets, {args.clients} clients")
    print(f"baseline (straight to the next hop): {baseline:8.1f} msg/s")
    print(f"through the worker:                  {through:8.1f} msg/s")
    print(f"ratio: {through / baseline:.2f}")
    expected = 2 * (args.messages // args.clients) * args.clients
    if handler.count != expected:
        raise SystemExit(f"next hop received {handler.count} messages, expected {expected}")


if __name__ == "__main__":
    main()
