"""A real worker on loopback in front of a real aiosmtpd next hop, both on ephemeral ports.

`next_hop` records every message it accepts; `start_filter(**config)` starts a worker
whose next hop is that recorder (or any port given) and stops it after the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from aiosmtpd.smtp import SMTP

from mailfilter.config import FilterConfig
from mailfilter.interfaces import Profile, StaticRecipientLookup
from mailfilter.policy import CLEAN
from mailfilter.server import FilterServer, ServerThread
from tests.mailfilter.processes import Runfilter, start_runfilter, stop_process


@dataclass
class Delivery:
    sender: str
    recipients: list[str]
    content: bytes
    mail_options: list[str]
    xforward: list[str]


class RecordingHandler:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.refuse_recipients: dict[str, str] = {}
        self.data_reply = "250 2.0.0 Ok: queued as NEXTHOP1"
        self.offer_xforward = True
        # A reply to every MAIL instead of accepting it (None: accept).
        self.mail_reply: str | None = None

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.offer_xforward:
            responses.insert(-1, "250-XFORWARD NAME ADDR PORT PROTO HELO")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_reply is not None:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse_recipients:
            return self.refuse_recipients[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        if not self.data_reply.startswith("2"):
            return self.data_reply
        self.deliveries.append(
            Delivery(
                sender=envelope.mail_from,
                recipients=list(envelope.rcpt_tos),
                content=envelope.original_content,
                mail_options=list(envelope.mail_options),
                xforward=list(getattr(server, "xforward_seen", [])),
            )
        )
        return self.data_reply


class RecordingSMTP(SMTP):
    async def smtp_XFORWARD(self, arg):
        self.xforward_seen = [*getattr(self, "xforward_seen", []), arg]
        await self.push("250 2.0.0 Ok")


class NextHopServer:
    def __init__(self, handler: RecordingHandler) -> None:
        self.handler = handler
        self._server: asyncio.Server | None = None
        self._sessions: list[RecordingSMTP] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def factory():
            session = RecordingSMTP(
                self.handler, hostname="next-hop.test", enable_SMTPUTF8=True, loop=loop
            )
            self._sessions.append(session)
            return session

        self._server = await loop.create_server(factory, "127.0.0.1", 0)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for session in self._sessions:
            if session.transport is not None:
                session.transport.close()
        await self._server.wait_closed()


@pytest.fixture
def next_hop():
    handler = RecordingHandler()
    thread = ServerThread(lambda: NextHopServer(handler))
    server = thread.start()
    handler.port = server.port
    yield handler
    thread.stop()


class MemorySink:
    """A quarantine that keeps messages in a list (the Django sink has its own tests)."""

    def __init__(self) -> None:
        self.kept: list[dict] = []

    async def write(self, *, category, message, sender, recipients, reasons, headers=()) -> str:
        self.kept.append(
            {"category": category, "message": message, "sender": sender,
             "recipients": list(recipients), "reasons": list(reasons),
             "headers": list(headers)}
        )
        return f"MEM{len(self.kept):09d}"


class BrokenSink:
    async def write(self, **kwargs) -> str:
        raise OSError("quarantine directory is read-only")


@dataclass
class QuarantineEverything:
    """A policy that holds every message with the given destiny."""

    destiny: str = "discard"
    category: str = "SPAM"
    reasons: Sequence[str] = field(default=("TEST_RULE",))

    async def decide(self, message, envelope, profile):
        from mailfilter.policy import Verdict

        return Verdict(category=self.category, destiny=self.destiny, reasons=self.reasons)


@dataclass
class RecordingPolicy:
    """A policy that passes every message and records (relay client?, profile name), and
    each envelope the checks got."""

    seen: list = field(default_factory=list)
    envelopes: list = field(default_factory=list)

    async def decide(self, message, envelope, profile):
        self.seen.append((envelope.relay_client, profile.name))
        self.envelopes.append(envelope)
        return CLEAN


@dataclass
class RunningFilter:
    server: FilterServer
    thread: ServerThread
    sink: object

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def stats(self):
        return self.server.stats

    def stat(self, name: str, label: str = "") -> int:
        return self.thread.call(lambda: self.server.stats.get(name, label))


@pytest.fixture
def start_filter(next_hop):
    threads: list[ServerThread] = []

    def start(*, sink=None, policy=None, lookup=None, next_hop_port=None, **changes):
        config = FilterConfig(
            listen_host="127.0.0.1",
            listen_port=0,
            next_hop_host="127.0.0.1",
            next_hop_port=next_hop_port or next_hop.port,
            hostname="filter.test",
            relay_connect_timeout=5,
            relay_command_timeout=5,
            relay_data_timeout=5,
        ).with_changes(**changes)
        sink = sink if sink is not None else MemorySink()
        thread = ServerThread(
            lambda: FilterServer(config, sink=sink, policy=policy, lookup=lookup)
        )
        threads.append(thread)
        server = thread.start()
        return RunningFilter(server=server, thread=thread, sink=sink)

    yield start
    for thread in threads:
        thread.stop()


def reject_profile_lookup(address: str) -> StaticRecipientLookup:
    return StaticRecipientLookup({address: Profile("closed", reject=True)})


def free_port() -> int:
    """A port nobody listens on (bound, then closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RawClient:
    """A line-level SMTP client over a plain socket, for bytes no library would send."""

    def __init__(self, port: int, *, timeout: float = 5) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply."""
        lines = []
        while True:
            while b"\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {b''.join(lines)!r}")
                self.buffer += chunk
            line, _, self.buffer = self.buffer.partition(b"\n")
            lines.append(line + b"\n")
            if len(line) < 4 or line[3:4] != b"-":
                return b"".join(lines)

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self, wait: float = 5) -> bool:
        """True once the server has closed the connection (anything left unread is dropped)."""
        self.sock.settimeout(wait)
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw():
    clients: list[RawClient] = []

    def connect(port: int, **kwargs) -> RawClient:
        client = RawClient(port, **kwargs)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


class LoopbackServer(socketserver.ThreadingTCPServer):
    """A threaded TCP server for scripted next hops: daemon threads, address reuse."""

    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def scripted_next_hop(
    handler: type[socketserver.BaseRequestHandler], **state
) -> Iterator[SimpleNamespace]:
    """Serve `handler` on an ephemeral loopback port in a thread until the block ends.

    Yields the hop's state: an object with the given attributes and `port`, which the
    handler reaches as `self.server.hop`."""
    server = LoopbackServer(("127.0.0.1", 0), handler)
    server.hop = SimpleNamespace(**state, port=server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.hop
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for CN=filter.test made with openssl: (cert, key) paths."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=filter.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture
def runfilter(tmp_path, next_hop):
    started: list[subprocess.Popen] = []

    def start(**env: str) -> Runfilter:
        full = {
            "FILTER_NEXT_HOP": f"127.0.0.1:{next_hop.port}",
            "QUARANTINE_DIR": str(tmp_path / "q"),
            "FILTER_PID_FILE": str(tmp_path / "filter.pid"),
            **env,
        }
        process = start_runfilter(full)
        started.append(process)
        return Runfilter(process, full)

    yield start
    for process in started:
        stop_process(process)
        process.stdout.close()
        process.stderr.close()
