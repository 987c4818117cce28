"""A next hop that offers PIPELINING and CHUNKING (Postfix's smtpd does): the envelope
goes in one write, and the message in one BDAT LAST command, not dot-stuffed, line ends
made CRLF, its reply deciding as with DATA."""

from __future__ import annotations

import smtplib
import socketserver

import pytest

from mailfilter.interfaces import StaticRecipientLookup
from mailfilter.policy import CheckPolicy
from mailfilter.profiles import parse_profile

from .conftest import scripted_next_hop


class _ChunkingHop(socketserver.StreamRequestHandler):
    """Just enough SMTP with RFC 3030 BDAT to record what arrives."""

    def handle(self) -> None:
        hop = self.server.hop
        self.wfile.write(b"220 hop ESMTP\r\n")
        while line := self.rfile.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.wfile.write(b"250-hop\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 CHUNKING\r\n")
            elif verb == b"MAIL":
                hop.mail_refused = hop.mail_reply[:1] != b"2"
                self.wfile.write(hop.mail_reply + b"\r\n")
            elif verb == b"RCPT" and hop.mail_refused:
                self.wfile.write(b"503 5.5.1 Error: need MAIL command\r\n")
            elif verb == b"BDAT":
                words = line.split()
                body = self.rfile.read(int(words[1]))
                hop.commands.append(b" ".join(words[:1] + words[2:]))
                hop.bodies.append(body)
                self.wfile.write(hop.bdat_reply + b"\r\n")
            elif verb == b"DATA":
                hop.commands.append(b"DATA")
                self.wfile.write(b"554 5.5.1 this test wants BDAT\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 2.0.0 Ok\r\n")


@pytest.fixture
def chunking_hop():
    with scripted_next_hop(
        _ChunkingHop,
        commands=[],
        bodies=[],
        bdat_reply=b"250 2.0.0 Ok: queued as CHUNKED",
        mail_reply=b"250 2.1.0 Ok",
        mail_refused=False,
    ) as hop:
        yield hop


MESSAGE = (
    b"From: a@remote.example\r\n"
    b"Subject: chunks\r\n"
    b"\r\n"
    b"first\r\n"
    b".a line that starts with a dot\r\n"
    b"last\r\n"
)


@pytest.mark.parametrize("message", [MESSAGE, MESSAGE.replace(b".a line", b"a line")])
def test_message_goes_in_one_bdat_last_exactly_as_received(start_filter, chunking_hop, message):
    worker = start_filter(next_hop_port=chunking_hop.port)
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.sendmail("a@remote.example", ["alice@example.test"], message)
    assert chunking_hop.commands == [b"BDAT LAST"]
    [body] = chunking_hop.bodies
    assert body.startswith(b"Received: from ") and body.endswith(b"\r\n" + message)


def test_bdat_refusal_is_the_clients_answer(start_filter, chunking_hop):
    chunking_hop.bdat_reply = b"554 5.7.1 not here"
    worker = start_filter(next_hop_port=chunking_hop.port)
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("a@remote.example")
        client.rcpt("alice@example.test")
        assert client.data(MESSAGE) == (554, b"5.7.1 not here")
        chunking_hop.bdat_reply = b"451 4.3.0 later"
        client.rset()
        client.mail("a@remote.example")
        client.rcpt("alice@example.test")
        code, text = client.data(MESSAGE)
    assert code == 451 and b"later" in text


def test_a_message_the_checks_rewrote_still_goes_with_crlf_line_ends(start_filter, chunking_hop):
    tagged = parse_profile("body_reject=1,first\nsubject_tag=[SPAM]\n", name="tagged")
    worker = start_filter(
        next_hop_port=chunking_hop.port,
        policy=CheckPolicy(),
        lookup=StaticRecipientLookup({"alice@example.test": tagged}),
    )
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.sendmail("a@remote.example", ["alice@example.test"], MESSAGE)
    [body] = chunking_hop.bodies
    assert b"Subject: [SPAM] chunks\r\n" in body
    assert body.count(b"\n") == body.count(b"\r\n")
    assert body.endswith(b"\r\n.a line that starts with a dot\r\nlast\r\n")


def test_sender_refused_in_a_pipelined_envelope_is_the_answer_to_each_rcpt(
    start_filter, chunking_hop
):
    chunking_hop.mail_reply = b"553 5.7.1 sender refused"
    worker = start_filter(next_hop_port=chunking_hop.port)
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        assert client.mail("a@remote.example")[0] == 250
        assert client.rcpt("alice@example.test") == (553, b"5.7.1 sender refused")
        assert client.rcpt("bob@example.test") == (553, b"5.7.1 sender refused")
    assert chunking_hop.commands == []
