"""The next hop's side at its edges (mailfilter/relay.py and its use in
mailfilter/server.py): pool slots given back however a client goes away, replies where a
refusal could be that say nothing of the message, LMTP replies kept when the connection
is lost half-way, and the lengths of the command and reply lines the worker makes.

Each test drives the real worker with a real client over loopback, in front of a
scripted next hop: a real threaded socket server that answers what the test tells it to
(it is not a mock of the relay code).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import socketserver
import struct
import threading
import time

import pytest

from mailfilter.policy import CLEAN

from .conftest import LoopbackServer

MESSAGE = b"From: a@remote.example\r\nSubject: next hop\r\n\r\nbody\r\n"


# --------------------------------------------------------------------------------------
# The scripted next hop
# --------------------------------------------------------------------------------------


class _HopHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        hop: ScriptedHop = self.server  # type: ignore[assignment]
        number = next(hop.counter)
        try:
            self._session(hop, number)
        except OSError:
            pass  # the worker closed the connection: nothing more to say

    def _session(self, hop: ScriptedHop, number: int) -> None:
        self.wfile.write(b"220 hop.test ESMTP\r\n")
        recipients: list[bytes] = []
        while line := self.rfile.readline():
            with hop.lock:
                hop.lines.append((number, line))
            verb = line.split(b" ", 1)[0].strip().upper()
            custom = hop.replies.get(verb)
            if custom is not None:
                out = custom(self, line, number)
                if out is None:
                    return  # close without a reply
                self.wfile.write(out)
                if verb == b"MAIL":
                    recipients = []
                continue
            if verb in (b"EHLO", b"LHLO"):
                keywords = [b"hop.test", *hop.extensions]
                self.wfile.write(b"".join(
                    b"250" + (b" " if i == len(keywords) - 1 else b"-") + k + b"\r\n"
                    for i, k in enumerate(keywords)
                ))
            elif verb == b"MAIL":
                recipients = []
                self.wfile.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                recipients.append(line.split(b"<", 1)[1].split(b">", 1)[0])
                self.wfile.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go ahead\r\n")
                body = self._read_data()
                out = hop.end_of_data(self, body, list(recipients), number)
                recipients = []
                if out is None:
                    return
                self.wfile.write(out)
            elif verb == b"QUIT":
                self.wfile.write(b"221 2.0.0 Bye\r\n")
                return
            else:
                self.wfile.write(b"250 2.0.0 Ok\r\n")

    def _read_data(self) -> bytes:
        lines = []
        while True:
            line = self.rfile.readline()
            if not line or line == b".\r\n":
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)


class ScriptedHop(LoopbackServer):
    def __init__(self, *, lmtp: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _HopHandler)
        self.lmtp = lmtp
        self.extensions: list[bytes] = [b"PIPELINING", b"8BITMIME"]
        # verb -> callable(handler, line, connection number) -> bytes to send, or None
        # to close the connection without a reply.
        self.replies: dict[bytes, object] = {}
        self.lines: list[tuple[int, bytes]] = []
        self.delivered: list[tuple[list[bytes], bytes]] = []
        self.counter = itertools.count(1)
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def end_of_data(self, handler, body: bytes, recipients: list[bytes], number: int):
        """The reply to the end of data (override per test); delivers by default."""
        with self.lock:
            self.delivered.append((recipients, body))
        if self.lmtp:
            return b"".join(b"250 2.0.0 <" + r + b"> delivered\r\n" for r in recipients)
        return b"250 2.0.0 Ok: queued as HOP1\r\n"

    def commands(self, verb: bytes) -> list[bytes]:
        with self.lock:
            return [line for _, line in self.lines if line.upper().startswith(verb)]


@pytest.fixture
def hop():
    servers: list[ScriptedHop] = []

    def make(**kwargs) -> ScriptedHop:
        server = ScriptedHop(**kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def _delayed(reply: bytes, seconds: float, *, connection: int | None = 1):
    """A reply given after `seconds` (on the given connection only; None: on all)."""

    def answer(handler, line, number):
        if connection is None or number == connection:
            time.sleep(seconds)
        return reply

    return answer


def _open_session(raw, port: int):
    client = raw(port)
    assert client.reply()[:3] == b"220"
    assert client.command(b"EHLO client.test")[:3] == b"250"
    return client


def _one_message_goes_through(raw, port: int) -> tuple[bytes, bytes]:
    """A whole transaction on a new session: (RCPT reply, end-of-data reply)."""
    client = _open_session(raw, port)
    assert client.command(b"MAIL FROM:<b@remote.example>")[:3] == b"250"
    rcpt = client.command(b"RCPT TO:<bob@example.test>")
    if rcpt[:3] != b"250":
        return rcpt, b""
    assert client.command(b"DATA")[:3] == b"354"
    return rcpt, client.command(MESSAGE + b".")


def _vanish(client) -> None:
    """The client is gone: its connection is reset (RST), so that the worker cannot take
    it for a half-close after which the client still reads its replies."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


# Pool of one connection; waiting for a free one gives up after 1.5 s.
POOL_OF_ONE = dict(max_backends=1, relay_connect_timeout=1.5)


# --------------------------------------------------------------------------------------
# Pool slots come back when the client goes away
# --------------------------------------------------------------------------------------


def test_client_gone_while_next_hop_answers_the_first_rcpt_gives_the_slot_back(
    start_filter, hop, raw
):
    """The client disconnects while the worker waits for the next hop's answers to the
    pipelined MAIL+RCPT (slow next hop): the slot is given back, and the next client's
    mail goes through a pool of one."""
    next_hop = hop()
    next_hop.replies[b"MAIL"] = _delayed(b"250 2.1.0 Ok\r\n", 1.0)
    worker = start_filter(next_hop_port=next_hop.port, **POOL_OF_ONE)
    client = _open_session(raw, worker.port)
    client.command(b"MAIL FROM:<a@remote.example>")
    client.send(b"RCPT TO:<alice@example.test>\r\n")
    time.sleep(0.3)
    _vanish(client)  # gone before the next hop answered
    time.sleep(1.2)  # the next hop has answered (or the connection is gone) by now
    rcpt, end = _one_message_goes_through(raw, worker.port)
    assert rcpt[:3] == b"250", rcpt
    assert end[:3] == b"250", end


def test_client_gone_while_next_hop_answers_the_end_of_data_gives_the_slot_back(
    start_filter, hop, raw
):
    """The client disconnects while the worker waits for the next hop's end-of-data
    reply: the connection, in the middle of the transaction, is closed and its slot
    given back."""
    next_hop = hop()
    slow = next_hop.end_of_data

    def slow_first(handler, body, recipients, number):
        if number == 1:
            time.sleep(1.0)
        return slow(handler, body, recipients, number)

    next_hop.end_of_data = slow_first
    worker = start_filter(next_hop_port=next_hop.port, **POOL_OF_ONE)
    client = _open_session(raw, worker.port)
    client.command(b"MAIL FROM:<a@remote.example>")
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    client.send(MESSAGE + b".\r\n")
    time.sleep(0.3)
    _vanish(client)
    time.sleep(1.2)
    rcpt, end = _one_message_goes_through(raw, worker.port)
    assert rcpt[:3] == b"250", rcpt
    assert end[:3] == b"250", end


class _SlowChecks:
    """Content checks that take a second (a spamd or clamd at work)."""

    async def decide(self, message, envelope, profile):
        await asyncio.sleep(1.0)
        return CLEAN


def test_client_gone_during_content_checks_gives_the_slot_back(start_filter, hop, raw):
    """The client disconnects while the message is being checked: the message is not
    relayed (the client, told nothing, sends it again) and the transaction's slot comes
    back."""
    next_hop = hop()
    worker = start_filter(next_hop_port=next_hop.port, policy=_SlowChecks(), **POOL_OF_ONE)
    client = _open_session(raw, worker.port)
    client.command(b"MAIL FROM:<a@remote.example>")
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    client.send(MESSAGE + b".\r\n")
    time.sleep(0.3)
    _vanish(client)
    time.sleep(0.3)
    rcpt, end = _one_message_goes_through(raw, worker.port)
    assert rcpt[:3] == b"250", rcpt
    assert end[:3] == b"250", end
    assert len(next_hop.delivered) == 1


def test_client_gone_while_next_hop_answers_a_later_rcpt_frees_the_slot_at_once(
    start_filter, hop, raw
):
    """The client disconnects while a second RCPT is in flight: the abort writes no RSET
    behind the unanswered RCPT (its reply could not be told apart); the connection
    closes and the slot is free at once, not after relay_command_timeout."""
    next_hop = hop()

    def rcpt(handler, line, number):
        if b"bob@" in line:
            time.sleep(0.6)
        return b"250 2.1.5 Ok\r\n"

    next_hop.replies[b"RCPT"] = rcpt
    worker = start_filter(next_hop_port=next_hop.port, relay_command_timeout=6, **POOL_OF_ONE)
    client = _open_session(raw, worker.port)
    client.command(b"MAIL FROM:<a@remote.example>")
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    client.send(b"RCPT TO:<bob@example.test>\r\n")
    time.sleep(0.2)
    _vanish(client)
    time.sleep(0.8)
    started = time.monotonic()
    client = _open_session(raw, worker.port)
    assert client.command(b"MAIL FROM:<b@remote.example>")[:3] == b"250"
    reply = client.command(b"RCPT TO:<carol@example.test>")
    assert reply[:3] == b"250", (reply, time.monotonic() - started)


def test_non_utf8_octet_in_the_sender_does_not_take_the_only_slot_forever(
    start_filter, hop, raw
):
    """MAIL FROM with an octet that is not UTF-8 cannot be written to the next hop: it
    gets 553, and takes no slot of the pool of one."""
    next_hop = hop()
    worker = start_filter(next_hop_port=next_hop.port, **POOL_OF_ONE)
    client = _open_session(raw, worker.port)
    assert client.command(b"MAIL FROM:<\xffa@remote.example>")[:3] == b"553"
    assert client.command(b"RSET")[:3] == b"250"
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    second = client.command(b"RCPT TO:<alice@example.test>")
    assert second[:3] == b"250", second


# --------------------------------------------------------------------------------------
# Odd next-hop replies at the end of the transaction
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
def test_data_command_answered_250_is_not_taken_for_delivery(start_filter, hop, raw, lmtp):
    """A next hop answers the DATA command itself with 250 (not 354): the message was
    never sent, so the client must not hear 2xx; it gets a 4xx and sends it again."""
    next_hop = hop(lmtp=lmtp)
    next_hop.replies[b"DATA"] = lambda handler, line, number: b"250 2.0.0 Ok\r\n"
    worker = start_filter(next_hop_port=next_hop.port, next_hop_lmtp=lmtp)
    client = _open_session(raw, worker.port)
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    reply = client.command(MESSAGE + b".")
    assert next_hop.delivered == []
    assert reply[:1] == b"4", reply


def test_end_of_data_250_without_a_space_is_not_answered_451(start_filter, hop, raw):
    """The next hop accepts the message with "250Ok..." (no space after the code, which
    aiosmtplib, smtplib and Postfix's client all accept): the client hears 250, not a
    451 that would have it send the message again."""
    next_hop = hop()
    deliver = next_hop.end_of_data

    def no_space(handler, body, recipients, number):
        deliver(handler, body, recipients, number)
        return b"250Ok: queued as HOP1\r\n"

    next_hop.end_of_data = no_space
    worker = start_filter(next_hop_port=next_hop.port)
    client = _open_session(raw, worker.port)
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    reply = client.command(MESSAGE + b".")
    assert len(next_hop.delivered) == 1
    assert reply[:3] == b"250", reply


# --------------------------------------------------------------------------------------
# LMTP: the recipients the next hop already answered
# --------------------------------------------------------------------------------------


def test_lmtp_next_hop_lost_after_the_first_recipients_reply_keeps_that_reply(
    start_filter, hop, raw
):
    """RFC 2033 4.2: one reply per recipient after the data. The LMTP next hop delivers
    to the first recipient (250), then the connection is lost before the second reply:
    the first keeps its 250 (no second delivery), the second gets a 451."""
    next_hop = hop(lmtp=True)

    def first_only(handler, body, recipients, number):
        with next_hop.lock:
            next_hop.delivered.append((recipients[:1], body))
        handler.wfile.write(b"250 2.0.0 <" + recipients[0] + b"> delivered\r\n")
        time.sleep(0.2)
        return None  # lost before the second reply

    next_hop.end_of_data = first_only
    worker = start_filter(next_hop_port=next_hop.port, next_hop_lmtp=True, lmtp=True)
    client = raw(worker.port)
    client.reply()
    assert client.command(b"LHLO postfix.test")[:3] == b"250"
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<one@example.test>")[:3] == b"250"
    assert client.command(b"RCPT TO:<two@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    client.send(MESSAGE + b".\r\n")
    replies = [client.reply(), client.reply()]
    assert [r[:3] for r in replies] == [b"250", b"451"], replies


# --------------------------------------------------------------------------------------
# XFORWARD command length
# --------------------------------------------------------------------------------------


def test_xforward_commands_stay_under_512_octets_with_a_long_helo(start_filter, hop, raw):
    """The client's HELO name becomes XFORWARD HELO=, xtext-encoded ('=' is +3D), 900
    characters here. XFORWARD_README: the command must fit in 512 octets, each value at
    most 255 characters; the value is cut to fit."""
    next_hop = hop()
    next_hop.extensions.append(b"XFORWARD NAME ADDR PORT PROTO HELO SOURCE")
    worker = start_filter(next_hop_port=next_hop.port)
    client = raw(worker.port)
    client.reply()
    assert client.command(b"EHLO " + b"=" * 300)[:3] == b"250"
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    sent = next_hop.commands(b"XFORWARD")
    assert sent, "no XFORWARD sent"
    assert max(len(line) for line in sent) <= 512, [len(line) for line in sent]


# --------------------------------------------------------------------------------------
# Reply lines the worker makes out of a long multi-line next-hop reply
# --------------------------------------------------------------------------------------


def test_lmtp_listener_reply_lines_stay_within_512_octets(start_filter, hop, raw):
    """An LMTP listener answers each recipient on one line, made of every line of a
    multi-line next-hop reply: four valid 410-octet lines must not become one line of
    over 1600 octets (RFC 5321 4.5.3.1.5: a reply line is at most 512 octets, CRLF
    included)."""
    next_hop = hop()
    line = b"5.7.1 " + b"x" * 400
    next_hop.end_of_data = lambda handler, body, recipients, number: (
        b"".join(b"554-" + line + b"\r\n" for _ in range(3)) + b"554 " + line + b"\r\n"
    )
    worker = start_filter(next_hop_port=next_hop.port, lmtp=True)
    client = raw(worker.port)
    client.reply()
    assert client.command(b"LHLO postfix.test")[:3] == b"250"
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    reply = client.command(MESSAGE + b".")
    assert reply[:3] == b"554"
    assert max(len(part) + 1 for part in reply.split(b"\n") if part) <= 512, len(reply)


# --------------------------------------------------------------------------------------
# The next hop's own 421 and codes no reply has
# --------------------------------------------------------------------------------------


def test_next_hops_421_at_rcpt_reaches_the_client_as_451_and_the_session_goes_on(
    start_filter, hop, raw
):
    """A 421 says the sender of it closes the connection (RFC 5321 4.2.2): the next hop's
    421 closes the next hop's connection, not the client's session with us. The client
    hears a 451 and its session goes on; the next transaction gets a fresh connection."""
    next_hop = hop()

    def closing(handler, line, number):
        if number == 1:
            handler.wfile.write(b"421 4.3.2 hop.test shutting down\r\n")
            return None
        return b"250 2.1.5 Ok\r\n"

    next_hop.replies[b"RCPT"] = closing
    worker = start_filter(next_hop_port=next_hop.port)
    client = _open_session(raw, worker.port)
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    reply = client.command(b"RCPT TO:<alice@example.test>")
    assert reply[:4] == b"451 " and b"421" in reply, reply
    assert client.command(b"RSET")[:3] == b"250"
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    assert client.command(MESSAGE + b".")[:3] == b"250"
    assert len(next_hop.delivered) == 1


@pytest.mark.parametrize("code", [b"199", b"354", b"999"])
def test_end_of_data_reply_with_a_code_no_final_reply_has_is_a_451(
    start_filter, hop, raw, code
):
    """Only a 2xx, 4xx or 5xx answers the end of data (RFC 5321 4.2.1). Anything else
    says nothing of the message: the client hears 451 (and sends it again), never the
    odd code, and the connection is not used again."""
    next_hop = hop()
    next_hop.end_of_data = lambda handler, body, recipients, number: code + b" what\r\n"
    worker = start_filter(next_hop_port=next_hop.port)
    client = _open_session(raw, worker.port)
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    reply = client.command(MESSAGE + b".")
    assert reply[:4] == b"451 ", reply
    # A second message opens a new next-hop connection.
    rcpt, _ = _one_message_goes_through(raw, worker.port)
    assert rcpt[:3] == b"250"
    assert len({number for number, line in next_hop.lines if line.startswith(b"EHLO")}) == 2


def test_client_gone_while_the_next_hop_answers_rset_after_refusing_mail_frees_one_slot():
    """The next hop refuses MAIL, the worker sends RSET, and the client goes away before
    the RSET is answered: the transaction's slot is given back once, not twice (a
    semaphore released twice would let more than max_backends connections open)."""
    from mailfilter.relay import Relay

    answered_rset = asyncio.Event()

    async def refusing_hop(reader, writer):
        try:
            writer.write(b"220 hop.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line.split()[0].upper()
                if verb == b"EHLO":
                    writer.write(b"250-hop.test\r\n250 PIPELINING\r\n")
                elif verb == b"MAIL":
                    writer.write(b"550 5.1.0 sender refused\r\n")
                elif verb == b"RCPT":
                    writer.write(b"503 5.5.1 need MAIL\r\n")
                elif verb == b"RSET":
                    await answered_rset.wait()  # not before the client is gone
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def main() -> int:
        server = await asyncio.start_server(refusing_hop, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        relay = Relay("127.0.0.1", port, helo="filter.test", max_backends=2,
                      command_timeout=10)
        _, transaction = relay.begin("a@remote.example")
        task = asyncio.create_task(transaction.rcpt("alice@example.test"))
        await asyncio.sleep(0.5)  # MAIL refused, RSET sent, its reply not yet come
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        free = relay._slots._value
        answered_rset.set()
        await relay.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.1)
        return free

    assert asyncio.run(main()) == 2
