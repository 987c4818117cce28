"""Counters of the worker, and a Prometheus text endpoint to read them.

The counters live in one process and are only touched from its event loop, so plain
integers suffice. `serve_metrics` answers `GET /metrics` on FILTER_METRICS_LISTEN; the
`filterstats` management command reads that endpoint.

With several worker processes (FILTER_PROCESSES) their parent serves the endpoint, with
the sums over all of them: each worker sends snapshots of its counters over a socket pair
(`SnapshotReporter`), asked for by the parent at each scrape and unasked every second when
they changed; the parent (`ProcessCounters`) keeps the last one of each process, also of a
process that died, so that the sums never go backwards while the service runs.
`MetricsEndpoint` is the parent's HTTP side, on a plain `selectors` loop: the parent forks
replacement workers, and a forked child must be able to close everything the parent had
open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import selectors
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

log = logging.getLogger(__name__)

# name -> help text. Counters with labels are rendered one line per label value.
COUNTERS: dict[str, str] = {
    "connections": "SMTP connections accepted",
    "connections_refused": "Connections refused with 421 (by reason: total, per_ip)",
    "tls_attempts": "STARTTLS commands received",
    "messages_received": "Messages whose DATA was read completely",
    "messages_passed": "Messages relayed to the next hop",
    "messages_quarantined": "Messages kept in the quarantine (by category)",
    "messages_rejected": "Messages refused after DATA (by reason)",
    "messages_tempfailed": "Messages answered with 4xx after DATA (by reason)",
    "bytes_received": "Octets of DATA read",
    "bytes_accepted": "Octets of messages relayed or quarantined",
    "bytes_rejected": "Octets of messages refused",
    "next_hop_attempts": "Transactions begun with the next hop",
    "next_hop_failures": "Next hop transactions that failed (by stage)",
    "protocol_errors": "Protocol errors (by kind)",
    "verdicts": "Content-check verdicts (by category: VIRUS, BANNED, SPAM, BADH, CLEAN, TEMPFAIL)",
    "badh_defects": "Messages with a bad-header or MIME defect (by defect name)",
    "banned_reasons": "Messages with a banned part (by reason kind)",
    "viruses_found": "Messages with a virus (by scanner: signatures, clamd)",
    "scanner_errors": "Scans that could not be completed (by scanner: clamd, spamd)",
    "reloads": "Profile and signature reloads (by result: ok, failed)",
    "dns_errors": "DNS check queries that decided nothing: timeout, SERVFAIL, missing zone "
    "(by profile variable)",
}


class Stats:
    def __init__(self) -> None:
        self._values: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def inc(self, name: str, amount: int = 1, *, label: str = "") -> None:
        if name not in COUNTERS:
            raise KeyError(name)
        self._values[name][label] += amount

    def get(self, name: str, label: str = "") -> int:
        return self._values.get(name, {}).get(label, 0)

    def total(self, name: str) -> int:
        return sum(self._values.get(name, {}).values())

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {name: dict(values) for name, values in self._values.items()}

    def clear(self) -> None:
        """Back to zero (a worker process forked from a parent that counted starts so)."""
        self._values.clear()

    def add(self, snapshot: Mapping[str, Mapping[str, int]]) -> None:
        """Add the counters of another process (its `snapshot()`) to these."""
        for name, values in snapshot.items():
            if name not in COUNTERS:
                continue
            for label, value in values.items():
                self._values[name][str(label)] += int(value)

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines = []
        for name, help_text in COUNTERS.items():
            metric = f"spamviewer_filter_{name}_total"
            lines.append(f"# HELP {metric} {help_text}")
            lines.append(f"# TYPE {metric} counter")
            values = self._values.get(name) or {"": 0}
            for label, value in sorted(values.items()):
                key = _label_key(name)
                suffix = f'{{{key}="{_escape(label)}"}}' if label else ""
                lines.append(f"{metric}{suffix} {value}")
        return "\n".join(lines) + "\n"


def _label_key(name: str) -> str:
    if name == "dns_errors":
        return "check"
    if name == "messages_quarantined":
        return "category"
    if name == "next_hop_failures":
        return "stage"
    if name in ("protocol_errors",):
        return "kind"
    if name == "verdicts":
        return "category"
    if name == "badh_defects":
        return "defect"
    if name in ("viruses_found", "scanner_errors"):
        return "scanner"
    if name == "reloads":
        return "result"
    return "reason"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse_metrics(text: str) -> dict[str, int]:
    """`{"metric{label}": value}` from the text format, for `filterstats`."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(float(value))
    return out


# The longest request the endpoint reads, and how long a client may take to send it.
REQUEST_LIMIT = 8192
REQUEST_TIMEOUT = 10.0


def http_response(request: bytes, render: Callable[[], str]) -> bytes:
    """The answer to one request: `GET /metrics` gets `render()`, anything else a 404."""
    method, _, rest = request.partition(b" ")
    path = rest.split(b" ", 1)[0]
    if method == b"GET" and path in (b"/metrics", b"/metrics/"):
        body = render().encode()
        head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
    else:
        body = b"not found\n"
        head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def serve_metrics(stats: Stats, host: str, port: int) -> asyncio.Server:
    """A minimal HTTP/1.0 server: `GET /metrics` returns the counters, anything else 404."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(
                reader.readuntil(b"\r\n\r\n"), timeout=REQUEST_TIMEOUT
            )
            writer.write(http_response(request, stats.render))
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, limit=REQUEST_LIMIT)


async def fetch_metrics(host: str, port: int, *, timeout: float = 5.0) -> str:
    """The body of `GET /metrics` from a running worker."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: worker\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200") and not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"metrics endpoint answered {head.splitlines()[0]!r}")
    return body.decode()


# -- several worker processes --------------------------------------------------------------


def snapshot_channel() -> tuple[socket.socket, socket.socket]:
    """The (parent, worker) ends of a channel for counter snapshots: one datagram a
    snapshot, so that neither side needs framing."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class SnapshotReporter:
    """The worker's end of a snapshot channel.

    A request from the parent (a number) is answered at once, from the event loop, with
    a snapshot carrying that number. Between requests a snapshot goes unasked every
    `interval` seconds when the counters changed, and a last one at `close()`: a process
    killed without warning takes at most its last second's counts with it.
    """

    def __init__(self, stats: Stats, channel: socket.socket, *, interval: float = 1.0) -> None:
        self.stats = stats
        self.channel = channel
        self.interval = interval
        self._sent: dict[str, dict[str, int]] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.channel.setblocking(False)
        loop.add_reader(self.channel.fileno(), self._requests)
        self._task = loop.create_task(self._unasked())

    def _requests(self) -> None:
        while True:
            try:
                data = self.channel.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                # The parent is gone: nobody asks any more.
                asyncio.get_running_loop().remove_reader(self.channel.fileno())
                return
            self._send(int(data) if data.isdigit() else 0)

    async def _unasked(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.stats.snapshot() != self._sent:
                self._send(0)

    def _send(self, token: int) -> None:
        snapshot = self.stats.snapshot()
        payload = json.dumps({"token": token, "counters": snapshot}, separators=(",", ":"))
        try:
            self.channel.send(payload.encode())
        except OSError:
            # The parent's queue is full (it is not reading) or the parent is gone: it
            # keeps the snapshot it has, and a later one carries these counts too.
            return
        self._sent = snapshot

    def close(self) -> None:
        """A last snapshot, then the channel closes (once the worker stopped serving)."""
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(RuntimeError, ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
        self._send(0)
        self.channel.close()


class ProcessCounters:
    """The parent's side: the last snapshot of each worker process, by pid, and the sums
    of the processes that are gone.

    `collect()` asks every running process for its counters and waits for the answers at
    most `timeout` seconds: a process that does not answer in time (hung, stopped, its
    event loop busy) counts with the last snapshot it sent. Such a process is not waited
    for again until it answered: the parent waits for nobody while it waits (several
    scrapes at once would each wait `timeout` seconds, one after the other).
    """

    def __init__(self, *, timeout: float = 1.0) -> None:
        self.timeout = timeout
        self._gone = Stats()
        self._channels: dict[int, socket.socket] = {}
        self._latest: dict[int, Mapping[str, Mapping[str, int]]] = {}
        self._answered: dict[int, int] = {}
        # Channels whose worker end is still open.
        self._open: set[int] = set()
        # Processes that did not answer a request in time: pid -> that request's token.
        self._late: dict[int, int] = {}
        self._token = 0

    def add(self, pid: int, channel: socket.socket) -> None:
        channel.setblocking(False)
        self._channels[pid] = channel
        self._latest[pid] = {}
        self._answered[pid] = 0
        self._open.add(pid)

    def channel(self, pid: int) -> socket.socket | None:
        return self._channels.get(pid)

    def read(self, pid: int) -> bool:
        """Take the snapshots the process sent; False once its end is closed."""
        channel = self._channels.get(pid)
        if channel is None or pid not in self._open:
            return False
        while True:
            try:
                data = channel.recv(1 << 20)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:
                self._open.discard(pid)
                return False
            try:
                message = json.loads(data)
                counters = message["counters"]
                token = int(message["token"])
                if not isinstance(counters, dict):
                    raise TypeError(type(counters).__name__)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("worker process %d sent a snapshot that does not read: %r",
                            pid, exc)
                continue
            self._latest[pid] = counters
            self._answered[pid] = max(self._answered[pid], token)

    def retire(self, pid: int) -> None:
        """The process is gone: what it sent last stays in the sums."""
        if pid not in self._channels:
            return
        self.read(pid)
        channel = self._channels.pop(pid)
        channel.close()
        self._open.discard(pid)
        self._answered.pop(pid, None)
        self._late.pop(pid, None)
        self._gone.add(self._latest.pop(pid))

    def collect(self) -> Stats:
        """The sums over every process, with fresh counters from those that answer."""
        self._token += 1
        token = self._token
        waiting: set[int] = set()
        for pid in list(self._open):
            if pid in self._late:
                if self.read(pid) and self._answered[pid] < self._late[pid]:
                    # Still silent: its last snapshot counts, without a wait.
                    continue
                del self._late[pid]
                if pid not in self._open:
                    continue
            with contextlib.suppress(OSError):
                self._channels[pid].send(str(token).encode())
                waiting.add(pid)
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as selector:
            for pid in waiting:
                selector.register(self._channels[pid], selectors.EVENT_READ, pid)
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for key, _ in selector.select(left):
                    pid = key.data
                    if not self.read(pid) or self._answered[pid] >= token:
                        waiting.discard(pid)
                        selector.unregister(key.fileobj)
        if waiting:
            log.warning("worker processes %s did not send their counters in time; their "
                        "last ones count", ", ".join(map(str, sorted(waiting))))
            for pid in waiting:
                self._late[pid] = token
        return self.total()

    def total(self) -> Stats:
        total = Stats()
        total.add(self._gone.snapshot())
        for counters in self._latest.values():
            total.add(counters)
        return total

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


def listening_socket(host: str, port: int, *, backlog: int = 64) -> socket.socket:
    """A bound, listening TCP socket for the endpoint."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class _Client:
    __slots__ = ("request", "response", "deadline")

    def __init__(self, deadline: float) -> None:
        self.request = bytearray()
        self.response = b""
        self.deadline = deadline


class MetricsEndpoint:
    """`serve_metrics` for a `selectors` loop run by the caller (the parent of several
    worker processes): the same answers, from `render()`; a client gets
    REQUEST_TIMEOUT seconds for its request and the answer, and at most `max_clients`
    are served at a time."""

    def __init__(
        self, sock: socket.socket, render: Callable[[], str], *, max_clients: int = 32
    ) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.render = render
        self.max_clients = max_clients
        self._clients: dict[socket.socket, _Client] = {}
        self._selector: selectors.BaseSelector | None = None

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def register(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        selector.register(self.sock, selectors.EVENT_READ, self)

    def handle(self, key: selectors.SelectorKey, mask: int) -> None:
        """One event of the caller's loop for a socket `register` gave it."""
        conn = key.fileobj
        if conn is self.sock:
            self._accept()
        elif mask & selectors.EVENT_READ:
            self._read(conn)  # type: ignore[arg-type]
        elif mask & selectors.EVENT_WRITE:
            self._write(conn)  # type: ignore[arg-type]

    def next_deadline(self) -> float | None:
        return min((c.deadline for c in self._clients.values()), default=None)

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for conn, client in list(self._clients.items()):
            if client.deadline <= now:
                self._drop(conn)

    def sockets(self) -> Iterable[socket.socket]:
        return [self.sock, *self._clients]

    def close(self) -> None:
        """Close every socket (in a forked child: its copies; the parent's stay open)."""
        for conn in self.sockets():
            conn.close()
        self._clients.clear()

    def _accept(self) -> None:
        assert self._selector is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("metrics endpoint: %s", exc)
                return
            if len(self._clients) >= self.max_clients:
                conn.close()
                continue
            conn.setblocking(False)
            self._clients[conn] = _Client(time.monotonic() + REQUEST_TIMEOUT)
            self._selector.register(conn, selectors.EVENT_READ, self)

    def _read(self, conn: socket.socket) -> None:
        client = self._clients[conn]
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        client.request += data
        end = client.request.find(b"\r\n\r\n")
        if end < 0:
            if len(client.request) > REQUEST_LIMIT:
                self._drop(conn)
            return
        client.response = http_response(bytes(client.request[: end + 4]), self.render)
        assert self._selector is not None
        self._selector.modify(conn, selectors.EVENT_WRITE, self)
        self._write(conn)

    def _write(self, conn: socket.socket) -> None:
        client = self._clients[conn]
        try:
            sent = conn.send(client.response)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(client.response)
        client.response = client.response[sent:]
        if not client.response:
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        self._clients.pop(conn, None)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn)
        conn.close()
