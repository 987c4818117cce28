"""The worker's SMTP/LMTP dialogue at its edges: per-recipient LMTP answers to a refused
message, timeouts that count the client's silence and not the worker's own work,
next-hop connection slots given back however a transaction ends, odd MAIL parameters,
pipelining after the 354, RSET/HELO/STARTTLS inside a transaction, and a client that
shuts its side down after QUIT. Real sockets on loopback."""

from __future__ import annotations

import asyncio
import smtplib
import socketserver
import threading
import time

import pytest

from mailfilter.policy import CLEAN

from .conftest import scripted_next_hop

MESSAGE = b"From: a@remote.example\r\nTo: alice@example.test\r\nSubject: edges\r\n\r\nbody\r\n"


def greeted(raw, port, helo=b"EHLO client.test"):
    client = raw(port)
    assert client.reply()[:3] == b"220"
    assert client.command(helo)[:3] == b"250"
    return client


class SlowPolicy:
    """Clean, after `delay` seconds (a scanner that takes its time)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def decide(self, message, envelope, profile):
        await asyncio.sleep(self.delay)
        return CLEAN


# A next hop whose first connection hangs before its greeting --------------------------


class _HangingHopHandler(socketserver.StreamRequestHandler):
    """Minimal SMTP next hop; the first `hang` connections get no greeting for a while."""

    def handle(self) -> None:
        hop = self.server.hop
        with hop.lock:
            hang = hop.hang > 0
            hop.hang -= 1
        if hang:
            hop.release.wait(10)
            return
        self.wfile.write(b"220 hop ESMTP\r\n")
        while line := self.rfile.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.wfile.write(b"250-hop\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go ahead\r\n")
                body = b""
                while (part := self.rfile.readline()) not in (b".\r\n", b""):
                    body += part
                hop.delivered.append(body)
                self.wfile.write(b"250 2.0.0 Ok: queued as HANG1\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 2.0.0 Ok\r\n")


@pytest.fixture
def hanging_hop():
    with scripted_next_hop(
        _HangingHopHandler,
        lock=threading.Lock(),
        hang=1,
        release=threading.Event(),
        delivered=[],
    ) as hop:
        yield hop
        hop.release.set()


# LMTP: one reply per accepted recipient, also for a refusal at the end of DATA ---------


@pytest.mark.parametrize(
    "changes, text, reply",
    [
        ({"bare_lf": "reject"}, b"Subject: a\nBcc: x@example.test\r\n\r\nbody\r\n", b"550"),
        ({"max_header_count": 1}, b"Subject: a\r\nX-Two: b\r\n\r\nbody\r\n", b"552"),
        ({"max_line_length": 100}, b"Subject: a\r\n\r\n" + b"x" * 200 + b"\r\n", b"500"),
        ({"max_message_size": 2048}, b"Subject: a\r\n\r\n" + (b"x" * 90 + b"\r\n") * 50,
         b"552"),
    ],
    ids=["bare-lf", "headers", "line", "size"],
)
def test_lmtp_refusal_at_end_of_data_is_answered_once_per_recipient(
    start_filter, next_hop, raw, changes, text, reply
):
    """RFC 2033 4.2: after the final dot an LMTP server sends one reply per accepted
    RCPT. A message refused by the DATA reader (bare LF, header count, line length,
    size) must get as many refusals as recipients, or the LMTP client (Postfix) reads
    the reply to its next command as the second recipient's answer."""
    worker = start_filter(lmtp=True, **changes)
    client = greeted(raw, worker.port, b"LHLO postfix.test")
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"RCPT TO:<bob@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    client.send(text + b".\r\n")
    first = client.reply()
    client.send(b"NOOP\r\n")
    second = client.reply()
    assert first[:3] == reply
    assert second[:3] == reply, (first, second)
    assert client.reply()[:3] == b"250"  # the NOOP's own reply
    assert next_hop.deliveries == []


# Timeouts count the client's silence, not the worker's own work ------------------------


def test_command_timeout_does_not_fire_while_the_worker_decides_the_message(
    start_filter, next_hop
):
    """The command timeout is the time allowed to the client (RFC 5321 4.5.3.2: the
    server waits for a command). While the worker itself runs the checks and relays
    the message (up to check_timeout + relay_data_timeout, which the generated Postfix
    *_data_done_timeout allows for), the client is waiting for us: the end of DATA
    must get the verdict, not a 421 and a dropped connection."""
    worker = start_filter(command_timeout=0.5, policy=SlowPolicy(1.5))
    with smtplib.SMTP("127.0.0.1", worker.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@remote.example")
        client.rcpt("alice@example.test")
        code, text = client.data(MESSAGE)
    assert code == 250, (code, text)
    assert len(next_hop.deliveries) == 1


def test_command_timeout_does_not_fire_while_the_next_hop_answers_rcpt(
    start_filter, hanging_hop
):
    """The same at RCPT: the next hop may take up to relay_connect_timeout +
    relay_command_timeout to answer; the client must get that answer, not a 421
    from our own command timer."""
    worker = start_filter(
        next_hop_port=hanging_hop.port, command_timeout=0.5, relay_connect_timeout=5
    )
    threading.Timer(1.5, hanging_hop.release.set).start()
    with smtplib.SMTP("127.0.0.1", worker.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@remote.example")
        # The first hop connection hangs, then closes: the worker answers 451.
        code, text = client.rcpt("alice@example.test")
    assert code == 451, (code, text)


def test_a_quarantine_write_that_does_not_finish_gives_451_in_time(start_filter, next_hop):
    """The quarantine copy gets as long as the next hop would (FILTER_RELAY_DATA_TIMEOUT):
    a store or database that stalls gives the client a 451 then, rather than holding the
    session while the worker's own work keeps the command timer off."""
    from tests.mailfilter.conftest import QuarantineEverything

    class StalledSink:
        async def write(self, **fields) -> str:
            await asyncio.sleep(30)
            return "never"

    worker = start_filter(
        sink=StalledSink(), policy=QuarantineEverything(destiny="discard"),
        relay_data_timeout=0.5,
    )
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", worker.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@remote.example")
        client.rcpt("alice@example.test")
        code, text = client.data(MESSAGE)
    assert code == 451 and b"copy" in text, (code, text)
    assert time.monotonic() - started < 5
    assert next_hop.deliveries == []


def test_command_timeout_is_enforced_after_a_message_when_data_timeout_is_longer(
    start_filter, next_hop, raw
):
    """After the end of DATA the client has command_timeout to send its next command
    (the timer must be armed for the shorter timeout again), not what is left of the
    longer data_timeout."""
    worker = start_filter(command_timeout=0.3, data_timeout=4)
    client = greeted(raw, worker.port)
    client.command(b"MAIL FROM:<a@remote.example>")
    client.command(b"RCPT TO:<alice@example.test>")
    assert client.command(b"DATA")[:3] == b"354"
    # The message takes longer than command_timeout to arrive (well within data_timeout),
    # so the timer is running on the data deadline when the end of data comes.
    client.send(MESSAGE[:20])
    time.sleep(0.6)
    client.send(MESSAGE[20:] + b".\r\n")
    assert client.reply()[:3] == b"250"
    started = time.monotonic()
    assert client.reply().startswith(b"421 4.4.2")
    assert time.monotonic() - started < 1.5, time.monotonic() - started


# Next-hop connection slots come back however a transaction ends ------------------------


def test_recipient_with_non_utf8_octets_does_not_leak_a_next_hop_slot(
    start_filter, next_hop, raw
):
    """A first RCPT address holding an octet that is not UTF-8 cannot be written to the
    next hop (it goes with MAIL in the first write): 553, and the slot of a pool of one
    stays free for the next client."""
    worker = start_filter(max_backends=1, relay_connect_timeout=1)
    client = greeted(raw, worker.port)
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<\xff@example.test>")[:3] == b"553"
    client.command(b"QUIT")
    with smtplib.SMTP("127.0.0.1", worker.port, timeout=10) as second:
        second.ehlo("client.test")
        second.mail("a@remote.example")
        code, text = second.rcpt("alice@example.test")
        assert code == 250, (code, text)


# MAIL parameters -----------------------------------------------------------------------


def test_size_parameter_with_a_non_ascii_digit_is_a_syntax_error(start_filter, raw):
    """`SIZE=²` passes str.isdigit() but not int(): it must get a 501 like any other
    bad SIZE value, not end the session without a reply (an exception out of
    data_received)."""
    worker = start_filter()
    client = greeted(raw, worker.port)
    reply = client.command("MAIL FROM:<a@remote.example> SIZE=²".encode())
    assert reply[:3] == b"501", reply
    assert client.command(b"NOOP")[:3] == b"250"


def test_repeated_size_parameter_is_a_syntax_error_not_a_temporary_failure(start_filter, raw):
    """RFC 5321 4.1.2 / RFC 1869: a parameter given twice is a syntax error (501).
    `SIZE=ABC SIZE=100` passes the check of the last value and then fails in the
    handler, which answers 451 and logs an internal error."""
    worker = start_filter()
    client = greeted(raw, worker.port)
    reply = client.command(b"MAIL FROM:<a@remote.example> SIZE=ABC SIZE=100")
    assert reply[:3] == b"501", reply
    assert worker.stat("protocol_errors", "internal_error") == 0


# Transactions ended and started again ---------------------------------------------


def test_message_and_quit_pipelined_after_354_get_both_replies_in_order(
    start_filter, next_hop, raw
):
    """Case 11 once the 354 is out: the message, its end and QUIT in one write give the
    end-of-data reply (after the next hop took the message), then 221; one delivery."""
    worker = start_filter()
    client = greeted(raw, worker.port)
    client.send(b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert [client.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
    client.send(MESSAGE + b".\r\nQUIT\r\n")
    assert client.reply()[:3] == b"250"
    assert client.reply()[:3] == b"221"
    assert client.closed()
    assert len(next_hop.deliveries) == 1


def test_rset_and_helo_mid_transaction_end_it_and_a_new_one_goes_through(
    start_filter, next_hop, raw
):
    """RSET, and HELO/EHLO, inside a transaction drop its envelope (RFC 5321 4.1.4):
    RCPT then needs a new MAIL, and the next message carries only its own recipients."""
    worker = start_filter()
    client = greeted(raw, worker.port)
    client.command(b"MAIL FROM:<a@remote.example>")
    assert client.command(b"RCPT TO:<old@example.test>")[:3] == b"250"
    assert client.command(b"RSET")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"503"
    client.command(b"MAIL FROM:<a@remote.example>")
    assert client.command(b"RCPT TO:<old2@example.test>")[:3] == b"250"
    assert client.command(b"EHLO client.test")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"503"
    client.command(b"MAIL FROM:<b@remote.example>")
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    assert client.command(MESSAGE + b".")[:3] == b"250"
    [delivery] = next_hop.deliveries
    assert (delivery.sender, delivery.recipients) == ("b@remote.example", ["alice@example.test"])


def test_xforward_inside_a_transaction_is_refused_and_reset_after_the_message(
    start_filter, next_hop, raw
):
    """Postfix XFORWARD_README: XFORWARD is refused (503) between MAIL and the end of
    the transaction, and its attributes last for one transaction only."""
    worker = start_filter()
    client = greeted(raw, worker.port, b"EHLO postfix.test")
    assert client.command(b"XFORWARD ADDR=192.0.2.7 NAME=mx.remote.example")[:3] == b"250"
    client.command(b"MAIL FROM:<a@remote.example>")
    assert client.command(b"XFORWARD ADDR=192.0.2.8")[:3] == b"503"
    client.command(b"RCPT TO:<alice@example.test>")
    client.command(b"DATA")
    assert client.command(MESSAGE + b".")[:3] == b"250"
    client.command(b"MAIL FROM:<a@remote.example>")
    client.command(b"RCPT TO:<alice@example.test>")
    client.command(b"DATA")
    assert client.command(MESSAGE + b".")[:3] == b"250"
    first, second = next_hop.deliveries
    assert b"mx.remote.example [192.0.2.7]" in first.content
    assert b"192.0.2.7" not in second.content and b"192.0.2.8" not in second.content


def test_bdat_is_not_offered_and_is_refused(start_filter, raw):
    """Case 33: CHUNKING is not offered, so BDAT gets a 500 and the session goes on."""
    worker = start_filter()
    client = raw(worker.port)
    client.reply()
    assert b"CHUNKING" not in client.command(b"EHLO client.test")
    client.command(b"MAIL FROM:<a@remote.example>")
    client.command(b"RCPT TO:<alice@example.test>")
    assert client.command(b"BDAT 0 LAST")[:3] == b"500"
    assert client.command(b"NOOP")[:3] == b"250"


# STARTTLS ------------------------------------------------------------------------------


def _tls_context(cert):
    import ssl

    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    return context


def test_failed_tls_handshake_closes_and_frees_the_connection_slot(
    start_filter, raw, certificate
):
    """A client that answers 220 Ready to start TLS with plaintext fails the handshake:
    the connection is closed and its place in the connection limits is given back."""
    cert, key = certificate
    worker = start_filter(tls_cert=str(cert), tls_key=str(key), max_per_ip=1)
    client = greeted(raw, worker.port)
    assert client.command(b"STARTTLS")[:3] == b"220"
    client.send(b"EHLO plaintext.example\r\n" * 20)
    assert client.closed()
    time.sleep(0.2)
    assert worker.thread.call(lambda: worker.server.gate.total) == 0
    assert worker.thread.call(lambda: len(worker.server._sessions)) == 0
    late = raw(worker.port)
    assert late.reply()[:3] == b"220"


def test_starttls_inside_a_transaction_forgets_the_envelope(
    start_filter, next_hop, raw, certificate
):
    """RFC 3207 4.2: after the handshake the server discards what it knew from the
    client, the MAIL transaction included: RCPT needs a new MAIL, and the message
    carries only the sender and recipients given over TLS."""
    cert, key = certificate
    worker = start_filter(tls_cert=str(cert), tls_key=str(key))
    client = greeted(raw, worker.port)
    assert client.command(b"MAIL FROM:<plain@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<plain@example.test>")[:3] == b"250"
    assert client.command(b"STARTTLS")[:3] == b"220"
    client.sock = _tls_context(cert).wrap_socket(client.sock, server_hostname="filter.test")
    ehlo = client.command(b"EHLO client.test")
    assert ehlo[:3] == b"250" and b"STARTTLS" not in ehlo
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"503"
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    assert client.command(MESSAGE + b".")[:3] == b"250"
    [delivery] = next_hop.deliveries
    assert (delivery.sender, delivery.recipients) == ("a@remote.example", ["alice@example.test"])
