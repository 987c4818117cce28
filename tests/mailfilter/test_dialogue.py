"""The worker's SMTP dialogue with a real client and a real next hop, on loopback."""

from __future__ import annotations

import asyncio
import re
import smtplib

import aiosmtplib
import pytest

from mailfilter.interfaces import Profile, StaticRecipientLookup
from mailfilter.policy import Verdict

from .conftest import BrokenSink, QuarantineEverything, free_port

MESSAGE = (
    b"From: Sender <sender@remote.example>\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: byte for byte\r\n"
    b"Message-ID: <m1@remote.example>\r\n"
    b"\r\n"
    b"Line one.\r\n"
    b".A line that starts with a dot.\r\n"
    b"..Two dots.\r\n"
    b"Trailing spaces   \r\n"
    b"\r\n"
    b"\tTab-indented last line.\r\n"
)


def top_headers_removed(content: bytes) -> bytes:
    """The relayed message minus the Received field the worker puts on top."""
    match = re.match(rb"Received: from [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*", content)
    assert match, content[:300]
    return content[match.end():]


def test_passed_message_arrives_byte_for_byte_plus_one_received_field(start_filter, next_hop):
    worker = start_filter()
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.sendmail("sender@remote.example", ["alice@example.test"], MESSAGE)
    [delivery] = next_hop.deliveries
    assert delivery.sender == "sender@remote.example"
    assert delivery.recipients == ["alice@example.test"]
    assert top_headers_removed(delivery.content) == MESSAGE
    assert delivery.content.startswith(b"Received: from ")
    assert b"by filter.test (spamviewer) with ESMTP id " in delivery.content
    assert b"for <alice@example.test>;" in delivery.content
    assert worker.stat("messages_passed") == 1


def test_a_message_the_checks_rewrote_is_dot_stuffed_again(start_filter, next_hop):
    """Received without a dot line, relayed as the checks rewrote it: the DATA reader's
    "nothing to stuff" no longer holds for what goes out."""
    rewritten = b"Subject: rewritten\r\n\r\n.a line that starts with a dot\r\n"

    class Rewrite:
        async def decide(self, message, envelope, profile):
            return Verdict(category=None, destiny="pass", message=rewritten)

    worker = start_filter(policy=Rewrite())
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.sendmail("sender@remote.example", ["alice@example.test"], b"Subject: a\r\n\r\nb\r\n")
    [delivery] = next_hop.deliveries
    assert top_headers_removed(delivery.content) == rewritten


def test_end_of_data_reply_is_the_next_hops_own(start_filter, next_hop):
    worker = start_filter()
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        client.rcpt("alice@example.test")
        code, text = client.data(MESSAGE)
    assert (code, text) == (250, b"2.0.0 Ok: queued as NEXTHOP1")


def test_smtputf8_and_8bitmime_pass_through_unchanged(start_filter, next_hop):
    worker = start_filter()
    body = "From: Jürgen <jürgen@exämple.test>\r\nSubject: Grüße\r\n\r\nMit 8 Bit: äöü €\r\n"
    message = body.encode("utf-8")

    async def send():
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=worker.port, start_tls=False)
        async with client:
            await client.sendmail(
                "jürgen@exämple.test", ["ålice@example.test"], message,
                mail_options=["SMTPUTF8", "BODY=8BITMIME"],
            )

    asyncio.run(send())
    [delivery] = next_hop.deliveries
    assert delivery.sender == "jürgen@exämple.test"
    assert delivery.recipients == ["ålice@example.test"]
    assert "SMTPUTF8" in delivery.mail_options and "BODY=8BITMIME" in delivery.mail_options
    assert top_headers_removed(delivery.content) == message
    assert b"with UTF8SMTP id" in delivery.content


def test_next_hop_down_gets_451_at_rcpt_and_nothing_is_accepted(start_filter):
    worker = start_filter(next_hop_port=free_port())
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        # MAIL goes to the next hop with the first RCPT.
        assert client.mail("sender@remote.example")[0] == 250
        for recipient in ("alice@example.test", "bob@example.test"):
            code, text = client.rcpt(recipient)
            assert code == 451 and b"Next hop unavailable" in text
        assert client.docmd("DATA")[0] == 503


def test_sender_the_next_hop_refuses_is_refused_at_each_rcpt(start_filter, next_hop):
    next_hop.mail_reply = "553 5.7.1 <sender@remote.example>: Sender address rejected"
    worker = start_filter()
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        assert client.mail("sender@remote.example")[0] == 250
        for recipient in ("alice@example.test", "bob@example.test"):
            assert client.rcpt(recipient) == (
                553, b"5.7.1 <sender@remote.example>: Sender address rejected"
            )
        assert client.docmd("DATA")[0] == 503
        client.rset()
        # The same connection goes on with the next transaction.
        next_hop.mail_reply = None
        client.sendmail("other@remote.example", ["alice@example.test"], MESSAGE)
    assert [d.sender for d in next_hop.deliveries] == ["other@remote.example"]


def test_next_hop_4xx_at_end_of_data_becomes_451_and_nothing_is_delivered(
    start_filter, next_hop
):
    next_hop.data_reply = "452 4.3.1 Insufficient system storage"
    worker = start_filter()
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        client.rcpt("alice@example.test")
        code, text = client.data(MESSAGE)
    assert code == 451 and b"Insufficient system storage" in text
    assert next_hop.deliveries == []
    assert worker.sink.kept == []


def test_next_hop_5xx_at_end_of_data_is_passed_on(start_filter, next_hop):
    next_hop.data_reply = "554 5.7.1 Content refused downstream"
    worker = start_filter()
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        client.rcpt("alice@example.test")
        code, text = client.data(MESSAGE)
    assert (code, text) == (554, b"5.7.1 Content refused downstream")


def test_next_hop_refusing_one_recipient_refuses_it_at_rcpt_and_delivers_the_others(
    start_filter, next_hop
):
    next_hop.refuse_recipients["gone@example.test"] = "550 5.1.1 <gone@example.test>: unknown"
    next_hop.refuse_recipients["full@example.test"] = "452 4.2.2 <full@example.test>: over quota"
    worker = start_filter()
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        assert client.rcpt("alice@example.test")[0] == 250
        assert client.rcpt("gone@example.test") == (550, b"5.1.1 <gone@example.test>: unknown")
        assert client.rcpt("full@example.test")[0] == 452
        assert client.rcpt("bob@example.test")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    [delivery] = next_hop.deliveries
    assert delivery.recipients == ["alice@example.test", "bob@example.test"]


def test_next_hop_that_dies_before_end_of_data_gets_451(start_filter, next_hop):
    worker = start_filter()
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        client.rcpt("alice@example.test")
        # Every open next-hop connection is cut before the message is sent.
        worker.thread.call(lambda: [c.close() for c, *_ in _open_clients(worker)])
        code, _ = client.data(MESSAGE)
    assert code == 451
    assert next_hop.deliveries == []


def _open_clients(worker):
    transaction = next(iter(worker.server._sessions)).envelope.relay
    return [(transaction.client,)]


def test_reject_profile_gets_554_and_nothing_is_kept_or_delivered(start_filter, next_hop):
    worker = start_filter(
        lookup=StaticRecipientLookup({"closed@example.test": Profile("closed", reject=True)})
    )
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        client.rcpt("closed@example.test")
        code, text = client.data(MESSAGE)
    assert code == 554 and b"profile closed rejects all mail" in text
    assert next_hop.deliveries == []
    assert worker.sink.kept == []


def test_recipient_with_a_different_profile_is_deferred_to_its_own_transaction(start_filter):
    worker = start_filter(
        lookup=StaticRecipientLookup({"closed@example.test": Profile("closed", reject=True)})
    )
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        assert client.rcpt("alice@example.test")[0] == 250
        code, text = client.rcpt("closed@example.test")
    assert code == 451 and b"send it separately" in text


def test_front_mode_refuses_unknown_recipients_at_rcpt(start_filter):
    worker = start_filter(
        mode="front",
        lookup=StaticRecipientLookup({"alice@example.test": Profile("alice")}, default=None),
    )
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        assert client.rcpt("alice@example.test")[0] == 250
        assert client.rcpt("user%evil.test@example.test")[0] == 550
        assert client.rcpt("nobody@example.test")[0] == 550


def test_discarded_message_is_answered_250_only_after_the_sink_kept_it(start_filter, next_hop):
    worker = start_filter(policy=QuarantineEverything(destiny="discard"))
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        client.rcpt("alice@example.test")
        code, text = client.data(MESSAGE)
    assert code == 250 and b"discarded, id=MEM000000001 - SPAM" in text
    [kept] = worker.sink.kept
    # What the quarantine keeps: our Received field, then the message as it came.
    assert kept["message"].startswith(b"Received: from client.test ([127.0.0.1])\r\n")
    assert kept["message"].endswith(b"\r\n" + MESSAGE)
    assert kept["recipients"] == ["alice@example.test"]
    assert next_hop.deliveries == []


def test_bounced_message_is_kept_then_refused_with_5xx(start_filter, next_hop):
    worker = start_filter(policy=QuarantineEverything(destiny="bounce", category="BANNED"))
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        client.rcpt("alice@example.test")
        code, text = client.data(MESSAGE)
    assert code == 554 and b"id=MEM000000001 - BANNED" in text
    assert len(worker.sink.kept) == 1
    assert next_hop.deliveries == []


@pytest.mark.parametrize("destiny", ["discard", "bounce"])
def test_quarantine_failure_gets_451_and_nothing_is_delivered(start_filter, next_hop, destiny):
    worker = start_filter(sink=BrokenSink(), policy=QuarantineEverything(destiny=destiny))
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        client.rcpt("alice@example.test")
        code, _ = client.data(MESSAGE)
    assert code == 451
    assert next_hop.deliveries == []


def test_next_hop_connection_is_reused_for_the_next_message(start_filter, next_hop):
    worker = start_filter()
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        for _ in range(3):
            client.sendmail("sender@remote.example", ["alice@example.test"], MESSAGE)
    assert len(next_hop.deliveries) == 3
    assert worker.stat("next_hop_attempts") == 3
    assert worker.stat("connections") == 1


def test_lmtp_listener_answers_once_per_recipient(start_filter, next_hop, raw):
    next_hop.refuse_recipients["gone@example.test"] = "550 5.1.1 <gone@example.test>: unknown"
    worker = start_filter(lmtp=True)
    client = raw(worker.port)
    client.reply()
    assert client.command(b"LHLO postfix.test")[:3] == b"250"
    assert client.command(b"MAIL FROM:<sender@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"RCPT TO:<gone@example.test>")[:3] == b"550"
    assert client.command(b"RCPT TO:<bob@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    client.send(MESSAGE + b".\r\n")
    replies = [client.reply(), client.reply()]
    assert all(r.startswith(b"250 2.0.0 Ok: queued as NEXTHOP1") for r in replies)
    assert client.command(b"NOOP")[:3] == b"250"  # no third reply was pending
    [delivery] = next_hop.deliveries
    assert delivery.recipients == ["alice@example.test", "bob@example.test"]
    assert b"with LMTP id" in delivery.content


def test_xforward_from_a_trusted_peer_is_passed_to_the_next_hop(start_filter, next_hop, raw):
    worker = start_filter()
    client = raw(worker.port)
    client.reply()
    ehlo = client.command(b"EHLO postfix.test")
    assert b"XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE" in ehlo
    assert client.command(b"XFORWARD NAME=mx.remote.example ADDR=192.0.2.7 PORT=4711")[:3] == b"250"
    assert client.command(b"XFORWARD PROTO=ESMTP HELO=mx.remote.example IDENT=4Abc")[:3] == b"250"
    assert client.command(b"MAIL FROM:<sender@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    assert client.command(MESSAGE + b".")[:3] == b"250"
    [delivery] = next_hop.deliveries
    sent = " ".join(delivery.xforward)
    for item in ("NAME=mx.remote.example", "ADDR=192.0.2.7", "PROTO=ESMTP",
                 "HELO=mx.remote.example"):
        assert item in sent
    assert "IDENT" not in sent  # the next hop did not offer it


def test_xforward_from_an_untrusted_peer_is_refused(start_filter, raw):
    worker = start_filter(xforward_hosts=("192.0.2.0/24",))
    client = raw(worker.port)
    client.reply()
    assert b"XFORWARD" not in client.command(b"EHLO client.test")
    assert client.command(b"XFORWARD ADDR=192.0.2.7")[:3] == b"550"


def test_recipient_lookup_failure_gets_451_not_a_bounce(start_filter):
    class UnreachableDirectory:
        async def profile_for(self, address):
            raise ConnectionError("directory unreachable")

    worker = start_filter(lookup=UnreachableDirectory())
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        assert client.rcpt("alice@example.test")[0] == 451
        assert client.noop()[0] == 250
