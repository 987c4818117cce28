"""An LMTP next hop (FILTER_NEXT_HOP=lmtp:host:port): its answer for each recipient is
the answer each recipient gets, against a real aiosmtpd LMTP server on loopback."""

from __future__ import annotations

import asyncio

import pytest
from aiosmtpd.lmtp import LMTP

from mailfilter.config import FilterConfig
from mailfilter.server import ServerThread

MESSAGE = b"From: a@remote.example\r\nSubject: lmtp\r\n\r\n.dot line\r\nbody\r\n"


class Mailboxes:
    """Delivers to some mailboxes, is over quota for one, has never heard of another."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, bytes]] = []
        self.lhlo: list[str] = []

    async def handle_DATA(self, server, session, envelope):
        self.lhlo.append(session.host_name)
        replies = []
        for rcpt in envelope.rcpt_tos:
            if rcpt.startswith("full@"):
                replies.append(f"452 4.2.2 <{rcpt}> mailbox full")
            elif rcpt.startswith("gone@"):
                replies.append(f"550 5.1.1 <{rcpt}> no such mailbox")
            else:
                self.delivered.append((rcpt, envelope.original_content))
                replies.append(f"250 2.0.0 <{rcpt}> delivered")
        return "\r\n".join(replies)


class LMTPServer:
    def __init__(self, handler: Mailboxes) -> None:
        self.handler = handler
        self.sessions: list[LMTP] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def factory():
            session = LMTP(self.handler, hostname="mailstore.test", loop=loop)
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


@pytest.fixture
def mailstore():
    handler = Mailboxes()
    thread = ServerThread(lambda: LMTPServer(handler))
    handler.port = thread.start().port
    yield handler
    thread.stop()


def test_lmtp_prefix_in_the_next_hop_selects_lmtp():
    config = FilterConfig.from_env({"FILTER_NEXT_HOP": "lmtp:127.0.0.1:24"})
    assert config.next_hop_lmtp and (config.next_hop_host, config.next_hop_port) == (
        "127.0.0.1", 24)
    assert FilterConfig.from_env({"FILTER_NEXT_HOP_LMTP": "True"}).next_hop_lmtp
    assert not FilterConfig.from_env({}).next_hop_lmtp


def test_lmtp_client_gets_each_recipients_own_answer(start_filter, mailstore, raw):
    worker = start_filter(next_hop_port=mailstore.port, next_hop_lmtp=True, lmtp=True)
    client = raw(worker.port)
    client.reply()
    assert client.command(b"LHLO postfix.test")[:3] == b"250"
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    for rcpt in (b"one@example.test", b"full@example.test", b"gone@example.test",
                 b"two@example.test"):
        assert client.command(b"RCPT TO:<" + rcpt + b">")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    client.send(MESSAGE.replace(b"\r\n.dot", b"\r\n..dot") + b".\r\n")
    replies = [client.reply() for _ in range(4)]
    assert [r[:3] for r in replies] == [b"250", b"451", b"550", b"250"], replies
    assert b"mailbox full" in replies[1] and b"no such mailbox" in replies[2]
    assert [r for r, _ in mailstore.delivered] == ["one@example.test", "two@example.test"]
    content = mailstore.delivered[0][1]
    assert content.endswith(MESSAGE)
    assert mailstore.lhlo == ["filter.test"]
    assert client.command(b"QUIT")[:3] == b"221"


def test_smtp_client_sends_one_recipient_at_a_time_to_an_lmtp_next_hop(
    start_filter, mailstore, raw
):
    worker = start_filter(next_hop_port=mailstore.port, next_hop_lmtp=True)
    client = raw(worker.port)
    client.reply()
    client.command(b"EHLO postfix.test")
    client.command(b"MAIL FROM:<a@remote.example>")
    assert client.command(b"RCPT TO:<gone@example.test>")[:3] == b"250"
    assert client.command(b"RCPT TO:<one@example.test>")[:3] == b"452"
    assert client.command(b"DATA")[:3] == b"354"
    client.send(MESSAGE + b".\r\n")
    reply = client.reply()
    assert reply[:3] == b"550" and b"no such mailbox" in reply
    client.command(b"MAIL FROM:<a@remote.example>")
    client.command(b"RCPT TO:<one@example.test>")
    client.command(b"DATA")
    client.send(MESSAGE + b".\r\n")
    assert client.reply()[:3] == b"250"
    assert [r for r, _ in mailstore.delivered] == ["one@example.test"]


def test_lmtp_next_hop_down_is_451(start_filter, raw):
    from .conftest import free_port

    worker = start_filter(next_hop_port=free_port(), next_hop_lmtp=True, lmtp=True)
    client = raw(worker.port)
    client.reply()
    client.command(b"LHLO postfix.test")
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<one@example.test>")[:3] == b"451"
