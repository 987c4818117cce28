"""End-of-data ambiguities, bare CR/LF and pipelining (security cases 1-9, 11, 12, 14).

Whatever the client sends, at most one message reaches the next hop per DATA, and what
reaches it is CRLF-clean: the fake commands after a non-standard "end of data" stay text
of the one message (bare_lf="normalise") or the message is refused (bare_lf="reject").
"""

from __future__ import annotations

import re

import pytest

HEAD = b"From: a@remote.example\r\nTo: alice@example.test\r\nSubject: first\r\n\r\nbody"
SMUGGLED = (
    b"MAIL FROM:<evil@remote.example>\r\n"
    b"RCPT TO:<alice@example.test>\r\n"
    b"DATA\r\n"
    b"From: ceo@example.test\r\nSubject: smuggled\r\n\r\nsecond\r\n"
)
# Cases 1-8: every "end of data" some server might take for one.
ENDINGS = [
    b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
    b"\r\n\x00.\r\n", b"\r\n.\x00\r\n",
]
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def open_transaction(raw, port):
    client = raw(port)
    assert client.reply()[:3] == b"220"
    assert client.command(b"EHLO client.test")[:3] == b"250"
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    return client


@pytest.mark.parametrize("ending", ENDINGS, ids=[repr(e)[2:-1] for e in ENDINGS])
def test_smuggled_second_message_stays_text_of_the_first_when_normalising(
    start_filter, next_hop, raw, ending
):
    worker = start_filter(bare_lf="normalise")
    client = open_transaction(raw, worker.port)
    client.send(HEAD + ending + SMUGGLED + b".\r\n")
    assert client.reply()[:3] == b"250"
    # Exactly one reply was due: the next one answers this NOOP, not a smuggled command.
    assert client.command(b"NOOP")[:3] == b"250"
    [delivery] = next_hop.deliveries
    assert b"MAIL FROM:<evil@remote.example>" in delivery.content
    assert not BARE.search(delivery.content)
    assert delivery.sender == "a@remote.example"


@pytest.mark.parametrize("ending", ENDINGS, ids=[repr(e)[2:-1] for e in ENDINGS])
def test_smuggled_second_message_is_refused_with_the_first_when_rejecting(
    start_filter, next_hop, raw, ending
):
    worker = start_filter(bare_lf="reject")
    client = open_transaction(raw, worker.port)
    client.send(HEAD + ending + SMUGGLED + b".\r\n")
    reply = client.reply()
    assert client.command(b"NOOP")[:3] == b"250"
    if BARE.search(ending):
        assert reply.startswith(b"550 5.6.0 Message contains bare CR or LF")
        assert next_hop.deliveries == []
    else:
        # The NUL variants end no line anywhere: one message, the NUL line inside it.
        assert reply[:3] == b"250"
        assert len(next_hop.deliveries) == 1


def test_bare_cr_in_a_header_reaches_policy_and_next_hop_as_the_same_crlf_line(
    start_filter, next_hop, raw
):
    seen = []

    class RecordingPolicy:
        async def decide(self, message, envelope, profile):
            from mailfilter.policy import CLEAN

            seen.append(message)
            return CLEAN

    worker = start_filter(bare_lf="normalise", policy=RecordingPolicy())
    client = open_transaction(raw, worker.port)
    client.send(b"Subject: a\rBcc: victim@example.test\r\nX-LF: b\nX-Two: c\r\n\r\nbody\r\n.\r\n")
    assert client.reply()[:3] == b"250"
    expected = b"Subject: a\r\nBcc: victim@example.test\r\nX-LF: b\r\nX-Two: c\r\n\r\nbody\r\n"
    assert seen == [expected]
    [delivery] = next_hop.deliveries
    assert delivery.content.endswith(expected)


def test_bare_cr_in_a_header_is_refused_when_rejecting(start_filter, next_hop, raw):
    worker = start_filter(bare_lf="reject")
    client = open_transaction(raw, worker.port)
    client.send(b"Subject: a\rBcc: victim@example.test\r\n\r\nbody\r\n.\r\n")
    assert client.reply()[:3] == b"550"
    assert next_hop.deliveries == []


def test_message_sent_with_quit_before_the_354_is_a_synchronization_error(
    start_filter, next_hop, raw
):
    """Case 11: DATA, the message and QUIT in one write."""
    worker = start_filter()
    client = raw(worker.port)
    client.reply()
    client.command(b"EHLO client.test")
    client.command(b"MAIL FROM:<a@remote.example>")
    client.command(b"RCPT TO:<alice@example.test>")
    client.send(b"DATA\r\n" + HEAD + b"\r\n.\r\nQUIT\r\n")
    assert client.reply().startswith(b"554 5.5.0 Error: SMTP protocol synchronization")
    assert client.closed()
    assert next_hop.deliveries == []


def test_pipelined_envelope_with_early_message_text_is_never_read_as_commands(
    start_filter, next_hop, raw
):
    """Case 12: MAIL, RCPT, DATA and text before any reply; a refused RCPT would make the
    text commands if the server read on."""
    next_hop.refuse_recipients["gone@example.test"] = "550 5.1.1 unknown"
    worker = start_filter()
    client = raw(worker.port)
    client.reply()
    client.command(b"EHLO client.test")
    client.send(
        b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<gone@example.test>\r\nDATA\r\n" + SMUGGLED
        + b".\r\n"
    )
    assert client.reply()[:3] == b"250"
    assert client.reply()[:3] == b"550"
    assert client.reply().startswith(b"554 5.5.0")
    assert client.closed()
    assert next_hop.deliveries == []


@pytest.mark.parametrize(
    "line",
    [b"MAIL FROM:<a@remote.example>\rRCPT TO:<alice@example.test>",
     b"MAIL FROM:<a@remote.example>\x00RCPT TO:<alice@example.test>"],
    ids=["cr", "nul"],
)
def test_cr_or_nul_inside_a_command_line_is_a_syntax_error_not_two_commands(
    start_filter, raw, line
):
    worker = start_filter()
    client = raw(worker.port)
    client.reply()
    client.command(b"EHLO client.test")
    assert client.command(line).startswith(b"501 5.5.2")
    # Nothing was started: RCPT has no MAIL to belong to.
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"503"


def test_command_ended_by_bare_lf_is_refused_when_rejecting(start_filter, raw):
    worker = start_filter(bare_lf="reject")
    client = raw(worker.port)
    client.reply()
    client.send(b"EHLO client.test\n")
    assert client.reply().startswith(b"501 5.5.2")
    assert client.command(b"EHLO client.test")[:3] == b"250"
