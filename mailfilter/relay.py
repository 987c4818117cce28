"""The next hop: a small pool of connections and one transaction at a time on each.

The worker proxies the envelope: each RCPT is sent to the next hop when the client sends
it, and the next hop's answer is the client's answer. A recipient the next hop refuses is
therefore refused (4xx or 5xx) to the client at RCPT time, and the sending MTA retries or
bounces that recipient itself; the recipients the next hop accepted are the only ones in
the transaction, so the single end-of-data reply of SMTP covers exactly them. MAIL is
checked at once but sent with the first RCPT (one round trip less per message): a sender
the next hop refuses is refused at each RCPT, as Postfix does with smtpd_delay_reject.

Every failure to talk to the next hop (refused connection, timeout, lost connection)
becomes a 451 reply, so the client keeps the message.

The client (`NextHopClient`) is a small one of our own, raising aiosmtplib's exceptions:
it sends XFORWARD, MAIL and the first RCPT in one write when the next hop offers
PIPELINING, the message in one BDAT LAST when it offers CHUNKING, and each
message in one write, which saves a round trip and a few copies per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiosmtplib
from aiosmtplib.esmtp import parse_esmtp_extensions

from mailfilter.stats import Stats

log = logging.getLogger(__name__)

# Characters that must never reach a command line of the next hop.
# Not in an address we pass on; nor are octets that are not UTF-8 (kept as surrogates).
_UNSAFE_ADDRESS = re.compile("[\x00-\x20\x7f<>\ud800-\udfff]")
# What xtext leaves as it is.
_XTEXT_SAFE = re.compile(r"[!-*,-<>-~]*")
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @classmethod
    def passed_on(cls, code: int, text: str) -> Reply:
        """A next hop's reply as our client gets it. Its 421 closes the next hop's
        connection, not ours: the client hears 451. A code no SMTP reply has says
        nothing either way: 451 too."""
        if code == 421 or not 200 <= code < 600:
            return unavailable(f"it answered {code} {' '.join(text.split())[:200]}")
        return cls(code, text)

    def lines(self) -> list[str]:
        parts = [_printable(p) for p in self.text.splitlines() if p.strip()] or ["Ok"]
        return parts

    def format(self, *, single_line: bool = False) -> str:
        """The reply as the client gets it (multi-line replies joined by CRLF)."""
        parts = self.lines()
        if single_line or len(parts) == 1:
            # A reply line is at most 512 octets, its CRLF included (RFC 5321 4.5.3.1.5).
            return f"{self.code} {' '.join(parts)[:_MAX_TEXT]}"
        return "\r\n".join(
            f"{self.code}{'-' if i < len(parts) - 1 else ' '}{p}" for i, p in enumerate(parts)
        )


# The most text on one reply line we send: 512 octets less the code, a space and CRLF.
_MAX_TEXT = 506


def _printable(text: str) -> str:
    if text.isascii() and text.isprintable():
        return text.strip()[:500]
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text.strip())[:500]


def unavailable(reason: str) -> Reply:
    return Reply(451, f"4.4.1 Next hop unavailable ({reason}), try again later")


def _xforward_value(value: str) -> str:
    """`value` xtext-encoded and cut to the 255 characters an XFORWARD attribute may have
    (Postfix's XFORWARD_README), never inside a `+XX`."""
    encoded = xtext(value)
    if len(encoded) > _XFORWARD_VALUE:
        encoded = encoded[:_XFORWARD_VALUE]
        escape = encoded.rfind("+", _XFORWARD_VALUE - 2)
        if escape >= 0:
            encoded = encoded[:escape]
    return encoded


_XFORWARD_VALUE = 255


def xtext(value: str) -> str:
    """RFC 1891 xtext: `+XX` for '+', '=' and anything outside printable ASCII."""
    if _XTEXT_SAFE.fullmatch(value):
        return value
    out = []
    for byte in value.encode("utf-8", "replace"):
        if 33 <= byte <= 126 and byte not in (43, 61):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


class Relay:
    """A pool of at most `max_backends` connections to the next hop."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        helo: str,
        max_backends: int = 20,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
        data_timeout: float = 600.0,
        idle_timeout: float = 20.0,
        stats: Stats | None = None,
        lmtp: bool = False,
    ) -> None:
        self.lmtp = lmtp
        self.host = host
        self.port = port
        self.helo = helo
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.idle_timeout = idle_timeout
        self.stats = stats or Stats()
        self._slots = asyncio.Semaphore(max_backends)
        self._idle: list[tuple[NextHopClient, float]] = []
        self._closed = False

    def begin(
        self,
        sender: str,
        *,
        size: int | None = None,
        eight_bit: bool = False,
        smtputf8: bool = False,
        xforward: Mapping[str, str] | None = None,
        dsn: Sequence[str] = (),
    ) -> tuple[Reply, Transaction | None]:
        """Take MAIL FROM: checked here and sent to the next hop with the first RCPT (see
        the module docstring), so the reply is ours, or a 553 for an unusable address."""
        if _UNSAFE_ADDRESS.search(sender):
            return Reply(553, "5.1.7 Bad sender address syntax"), None
        mail = _Mail(sender, size, eight_bit, smtputf8, dict(xforward or {}), tuple(dsn))
        return Reply(250, "2.1.0 Ok"), Transaction(self, mail)

    async def _start(
        self, mail: _Mail, address: str, dsn: Sequence[str]
    ) -> tuple[NextHopClient | None, Reply]:
        """Open the transaction on a connection: XFORWARD, MAIL and the first RCPT, in one
        write when the next hop offers PIPELINING. Returns the connection and the RCPT's
        reply, or None and the reply the client gets for the RCPT instead (the next hop's
        refusal of MAIL, or a 451)."""
        self.stats.inc("next_hop_attempts")
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), self.connect_timeout)
            except TimeoutError:
                self.stats.inc("next_hop_failures", label="busy")
                return None, unavailable("all connections busy")
        else:
            await self._slots.acquire()
        slot = _Slot(self._slots)
        try:
            return await self._open(mail, address, dsn, slot)
        except BaseException:
            # Cancelled (the client went away) or a failure of ours: the slot is given
            # back unless already given on, and a connection left in the middle of a
            # command closes itself.
            slot.give_back()
            raise

    async def _open(
        self, mail: _Mail, address: str, dsn: Sequence[str], slot: _Slot
    ) -> tuple[NextHopClient | None, Reply]:
        """`_start` once the slot is taken: every return that gives no connection has
        given the slot back; a connection returned holds it."""
        # A pooled connection may have been closed by the next hop meanwhile: one retry
        # on a fresh connection.
        for attempt in (1, 2):
            client, reused = await self._connection(fresh=attempt == 2)
            slot.connection = client
            if client is None:
                slot.give_back()
                self.stats.inc("next_hop_failures", label="connect")
                return None, unavailable("cannot connect")
            if mail.smtputf8 and not client.supports_extension("smtputf8"):
                slot.handed_on()
                self._release(client, reusable=True)
                return None, Reply(451, "4.5.0 Next hop does not support SMTPUTF8")
            commands = self._mail_commands(client, mail)
            rcpt = _rcpt_command(client, address, dsn)
            try:
                if client.supports_extension("pipelining"):
                    # RFC 2920: XFORWARD, MAIL and RCPT in one write; the replies to
                    # XFORWARD change nothing.
                    responses = await client.execute_commands(
                        [*commands, rcpt], timeout=self.command_timeout
                    )
                    mail_response, rcpt_response = responses[-2], responses[-1]
                else:
                    for command in commands:
                        mail_response = await client.execute_command(
                            *command, timeout=self.command_timeout
                        )
                    rcpt_response = None
                    if mail_response.code == 250:
                        rcpt_response = await client.execute_command(
                            *rcpt, timeout=self.command_timeout
                        )
            except (aiosmtplib.SMTPException, OSError) as exc:
                client.close()
                if reused and attempt == 1:
                    continue
                slot.give_back()
                self.stats.inc("next_hop_failures", label="mail")
                log.warning("next hop %s:%s failed at MAIL: %s", self.host, self.port, exc)
                return None, unavailable("lost connection")
            if mail_response.code == 421 and reused and attempt == 1:
                client.close()
                continue
            if mail_response.code != 250 or rcpt_response is None:
                self.stats.inc("next_hop_failures", label="mail")
                # _reset gives the slot back however it ends.
                slot.handed_on()
                await self._reset(client)
                return None, Reply.passed_on(mail_response.code, mail_response.message)
            slot.handed_on()
            return client, Reply.passed_on(rcpt_response.code, rcpt_response.message)
        raise AssertionError("unreachable")

    def _mail_commands(self, client: NextHopClient, mail: _Mail) -> list[tuple[bytes, ...]]:
        commands = (
            self._xforward(client, mail.xforward)
            if mail.xforward and client.supports_extension("xforward")
            else []
        )
        options = []
        if mail.size is not None and client.supports_extension("size"):
            options.append(f"SIZE={mail.size}".encode())
        if mail.eight_bit and client.supports_extension("8bitmime"):
            options.append(b"BODY=8BITMIME")
        if mail.smtputf8:
            options.append(b"SMTPUTF8")
        if mail.dsn and client.supports_extension("dsn"):
            # A next hop without DSN gets the message without them (RFC 3461 4.1 would
            # have us send a "relayed" notice; Postfix's reinjection smtpd and LMTP
            # servers all offer DSN).
            options.extend(p.encode("ascii") for p in mail.dsn)
        commands.append((b"MAIL", b"FROM:<" + mail.sender.encode("utf-8") + b">", *options))
        return commands

    async def _connection(self, *, fresh: bool) -> tuple[Any, bool]:
        now = time.monotonic()
        while self._idle and not fresh:
            client, since = self._idle.pop()
            if now - since < self.idle_timeout and client.is_connected:
                return client, True
            await _quit(client)
        client = NextHopClient(
            self.host,
            self.port,
            local_hostname=self.helo,
            timeout=self.command_timeout,
            lmtp=self.lmtp,
        )
        try:
            await client.connect(timeout=self.connect_timeout)
            await client.ehlo()
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.warning("next hop %s:%s: %s", self.host, self.port, exc)
            client.close()
            return None, False
        except BaseException:
            client.close()
            raise
        return client, False

    def _xforward(
        self, client: NextHopClient, attrs: Mapping[str, str]
    ) -> list[tuple[bytes, ...]]:
        """The XFORWARD commands (each under 512 octets) giving the client's attributes
        the next hop asked for."""
        offered = set(client.esmtp_extensions.get("xforward", "").upper().split())
        items = [
            f"{name}={_xforward_value(attrs[name])}"
            for name in XFORWARD_ATTRIBUTES
            if name in offered and attrs.get(name)
        ]
        commands: list[tuple[bytes, ...]] = []
        command: list[str] = []
        for item in items:
            if command and len("XFORWARD " + " ".join([*command, item])) > 500:
                commands.append((b"XFORWARD", " ".join(command).encode()))
                command = []
            command.append(item)
        if command:
            commands.append((b"XFORWARD", " ".join(command).encode()))
        return commands

    async def _reset(self, client: NextHopClient) -> None:
        try:
            response = await client.execute_command(b"RSET", timeout=self.command_timeout)
        except BaseException as exc:
            self._release(client, reusable=False)
            if isinstance(exc, (aiosmtplib.SMTPException, OSError)):
                return
            raise
        self._release(client, reusable=response.code == 250)

    def _release(self, client: NextHopClient, *, reusable: bool) -> None:
        if reusable and not self._closed and client.is_connected and self.idle_timeout > 0:
            self._idle.append((client, time.monotonic()))
        else:
            client.close()
        self._slots.release()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for client, _ in idle:
            await _quit(client)


async def _quit(client: NextHopClient) -> None:
    try:
        if client.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await client.quit(timeout=2)
    finally:
        client.close()


class _Slot:
    """One taken slot of the pool, given back exactly once: by `give_back`, or by whoever
    it is handed on to (a connection returned, `_reset`, `_release`)."""

    __slots__ = ("_semaphore", "held", "connection")

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self.held = True
        # The connection opened or taken from the pool for it, until handed on.
        self.connection: NextHopClient | None = None

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self._semaphore.release()
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()

    def handed_on(self) -> None:
        self.held = False
        self.connection = None


@dataclass(frozen=True)
class _Mail:
    """MAIL FROM as the client sent it, until the first RCPT opens the transaction."""

    sender: str
    size: int | None
    eight_bit: bool
    smtputf8: bool
    xforward: dict[str, str]
    dsn: tuple[str, ...]


def _rcpt_command(client: NextHopClient, address: str, dsn: Sequence[str]) -> tuple[bytes, ...]:
    options = [p.encode("ascii") for p in dsn] if dsn and client.supports_extension("dsn") else []
    return (b"RCPT", b"TO:<" + address.encode("utf-8") + b">", *options)


class Transaction:
    """One MAIL transaction; on a next-hop connection from its first RCPT on, and ended
    with `data` or `abort`."""

    def __init__(self, relay: Relay, mail: _Mail) -> None:
        self.relay = relay
        self.mail = mail
        self.client: NextHopClient | None = None
        self.accepted: list[str] = []
        # The reply every RCPT gets once the next hop refused MAIL (or could not be
        # reached), as Postfix reports a refused sender at RCPT (smtpd_delay_reject).
        self.refused: Reply | None = None
        self.ended = False

    async def rcpt(self, address: str, *, dsn: Sequence[str] = ()) -> Reply:
        if self.ended:
            return unavailable("transaction closed")
        if self.refused is not None:
            return self.refused
        if _UNSAFE_ADDRESS.search(address):
            return Reply(553, "5.1.3 Bad recipient address syntax")
        client = self.client
        if client is None:
            client, reply = await self.relay._start(self.mail, address, dsn)
            if self.ended:
                # The session ended while the next hop answered.
                if client is not None:
                    await self.relay._reset(client)
                return unavailable("transaction closed")
            if client is None:
                self.refused = reply
                return reply
            self.client = client
        else:
            try:
                response = await client.execute_command(
                    *_rcpt_command(client, address, dsn), timeout=self.relay.command_timeout
                )
            except (aiosmtplib.SMTPException, OSError) as exc:
                log.warning("next hop failed at RCPT: %s", exc)
                self._finish(reusable=False)
                self.relay.stats.inc("next_hop_failures", label="rcpt")
                return unavailable("lost connection")
            reply = Reply.passed_on(response.code, response.message)
        if reply.ok:
            self.accepted.append(address)
        return reply

    async def data(self, message: bytes, *, verbatim: bool = False) -> Reply:
        """Send the message; the reply is the next hop's end-of-data reply, or a 451.
        `verbatim`: every line of `message` ends in CRLF and none starts with a dot."""
        client = self.client
        if client is None:
            return unavailable("transaction closed")
        try:
            response = await client.data(
                message, timeout=self.relay.data_timeout, verbatim=verbatim
            )
        except aiosmtplib.SMTPDataError as exc:
            self.relay.stats.inc("next_hop_failures", label="data")
            await self.abort()
            return Reply.passed_on(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError) as exc:
            # No reply to the end of data: whether the next hop kept the message is
            # unknown, and a 451 lets the client try again (at worst a duplicate).
            log.warning("next hop failed at DATA: %s", exc)
            self.relay.stats.inc("next_hop_failures", label="data")
            self._finish(reusable=False)
            return unavailable("no reply to the message")
        except BaseException:
            # Cancelled (the client is gone): the connection may be in the middle of
            # the message.
            self._finish(reusable=False)
            raise
        self._finish(reusable=True)
        return Reply.passed_on(response.code, response.message)

    async def data_per_recipient(
        self, message: bytes, *, verbatim: bool = False
    ) -> list[Reply]:
        """LMTP next hop: the message, and one reply per accepted recipient (RFC 2033),
        in RCPT order; every recipient gets a 451 when the next hop fails."""
        client = self.client
        if client is None or not client.lmtp:
            return [await self.data(message, verbatim=verbatim)] * max(1, len(self.accepted))
        count = len(self.accepted)
        try:
            responses = await client.lmtp_data(
                message, count, timeout=self.relay.data_timeout, verbatim=verbatim
            )
        except aiosmtplib.SMTPDataError as exc:
            self.relay.stats.inc("next_hop_failures", label="data")
            await self.abort()
            return [Reply.passed_on(exc.code, exc.message)] * count
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.warning("next hop failed at DATA: %s", exc)
            self.relay.stats.inc("next_hop_failures", label="data")
            self._finish(reusable=False)
            return [unavailable("no reply to the message")] * count
        except BaseException:
            self._finish(reusable=False)
            raise
        replies = [Reply.passed_on(r.code, r.message) for r in responses]
        if len(replies) < count:
            # The recipients answered keep their answers (a 250 is a delivery); the
            # others try again (RFC 2033 4.2, as Postfix's LMTP client does).
            log.warning("next hop lost after %d of %d replies", len(replies), count)
            self.relay.stats.inc("next_hop_failures", label="data")
            self._finish(reusable=False)
            return replies + [unavailable("no reply to the message")] * (count - len(replies))
        self._finish(reusable=True)
        return replies

    async def abort(self) -> None:
        """End the transaction without sending the message (RSET, back to the pool)."""
        self.ended = True
        client, self.client = self.client, None
        if client is not None:
            await self.relay._reset(client)

    def drop(self) -> None:
        """End the transaction at once, without a word to the next hop: its connection
        closes (it may be in the middle of a command) and the slot is given back."""
        self._finish(reusable=False)

    def _finish(self, *, reusable: bool) -> None:
        self.ended = True
        client, self.client = self.client, None
        if client is not None:
            self.relay._release(client, reusable=reusable)


_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
# A line that starts with a dot, once every line end is CRLF.
_DOT_LINE = re.compile(rb"\n\.")
# Nothing of this may reach a command line of the next hop (aiosmtplib refuses the same).
_COMMAND_UNSAFE = re.compile(rb"[\x00-\x1f\x7f]")
# A reply line, and a whole (multi-line) reply, may not be longer (aiosmtplib's bounds);
# nor may what the next hop sent and was not read yet.
_MAX_REPLY_LINE = 8192
_MAX_REPLY = 4 * _MAX_REPLY_LINE
_MAX_UNREAD = 1024 * 1024


def crlf_text(message: bytes, *, verbatim: bool = False) -> bytes:
    """The message with every line end made CRLF and a final CRLF. `verbatim`: the
    caller knows it is so already (the worker's DATA reader says so of most messages),
    which spares three passes over a large message."""
    if verbatim and message.endswith(b"\r\n"):
        return message
    lines = message.count(b"\n")
    if message.count(b"\r") != lines or message.count(b"\r\n") != lines:
        message = _LINE_ENDS.sub(b"\r\n", message)
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message


def wire_text(message: bytes, *, verbatim: bool = False) -> bytes:
    """The message as sent after DATA: `crlf_text`, a line starting with a dot given
    another (RFC 5321 4.5.2), then the end of data. `verbatim`: besides, no line starts
    with a dot."""
    if verbatim and message.endswith(b"\r\n"):
        return message + b".\r\n"
    message = crlf_text(message)
    if message.startswith(b"."):
        message = b"." + message
    if _DOT_LINE.search(message):
        message = message.replace(b"\r\n.", b"\r\n..")
    return message + b".\r\n"


class _ReplyReader(asyncio.Protocol):
    """The client's side of the connection: what the next hop sent, until read."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ended = False
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _MAX_UNREAD:
            self.error = aiosmtplib.SMTPResponseException(-1, "Response too long")
            assert self.transport is not None
            self.transport.close()
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.transport = None
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def more(self, deadline: float) -> None:
        """Wait for more input, the end of the connection, or TimeoutError at `deadline`
        (loop time). One timer per wait: cheaper than asyncio.timeout() per reply."""
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if self._waiter is waiter:
                self._waiter = None

    @property
    def waiting(self) -> bool:
        return self._waiter is not None


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class NextHopClient:
    """Just enough of an SMTP (or, with `lmtp`, RFC 2033 LMTP) client for the next hop,
    shaped like aiosmtplib.SMTP and raising its exceptions.

    Compared with aiosmtplib it can send several commands in one write when the next hop
    offers PIPELINING, reads the one reply per accepted recipient that LMTP sends after
    the data, and sends the message with one write. Replies nobody asked for are never
    taken for the answer to the next command: the connection is given up instead.
    """

    def __init__(
        self, host: str, port: int, *, local_hostname: str, timeout: float, lmtp: bool = False
    ) -> None:
        self.host = host
        self.port = port
        self.local_hostname = local_hostname
        self.timeout = timeout
        self.lmtp = lmtp
        self.esmtp_extensions: dict[str, str] = {}
        self._protocol: _ReplyReader | None = None

    @property
    def is_connected(self) -> bool:
        protocol = self._protocol
        return (
            protocol is not None
            and protocol.transport is not None
            and not protocol.transport.is_closing()
            and not protocol.ended
        )

    def supports_extension(self, extension: str) -> bool:
        return extension.lower() in self.esmtp_extensions

    async def connect(self, *, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, protocol = await loop.create_connection(
                    lambda: _ReplyReader(loop), self.host, self.port
                )
        except (OSError, TimeoutError) as exc:
            raise aiosmtplib.SMTPConnectError(str(exc)) from exc
        self._protocol = protocol
        [greeting] = await self._replies(1, timeout)
        if greeting.code != 220:
            self.close()
            raise aiosmtplib.SMTPConnectError(f"greeting {greeting.code} {greeting.message}")

    async def ehlo(self) -> aiosmtplib.SMTPResponse:
        verb = b"LHLO" if self.lmtp else b"EHLO"
        response = await self.execute_command(verb, self.local_hostname.encode("ascii"))
        if response.code != 250:
            raise aiosmtplib.SMTPHeloError(response.code, response.message)
        self.esmtp_extensions, _ = parse_esmtp_extensions(response.message)
        return response

    async def execute_command(
        self, *args: bytes, timeout: float | None = None
    ) -> aiosmtplib.SMTPResponse:
        [response] = await self.execute_commands([args], timeout=timeout)
        return response

    async def execute_commands(
        self, commands: Sequence[Sequence[bytes]], *, timeout: float | None = None
    ) -> list[aiosmtplib.SMTPResponse]:
        """Several commands in one write, and their replies in order (PIPELINING: the
        caller makes sure the next hop offers it when there is more than one)."""
        lines = []
        for args in commands:
            for arg in args:
                if _COMMAND_UNSAFE.search(arg):
                    raise ValueError("command contains a control character")
            lines.append(b" ".join(args) + b"\r\n")
        self._write(b"".join(lines))
        return await self._replies(len(lines), timeout or self.timeout)

    async def data(
        self, message: bytes, *, timeout: float, verbatim: bool = False
    ) -> aiosmtplib.SMTPResponse:
        """The message after DATA, or in one BDAT LAST when the next hop offers CHUNKING
        (RFC 3030: one round trip less, and no dot-stuffing); raises SMTPDataError
        unless the next hop took it (250)."""
        if self.supports_extension("chunking") and not self.lmtp:
            body = crlf_text(message, verbatim=verbatim)
            self._write(b"BDAT %d LAST\r\n" % len(body) + body)
        else:
            await self._start_data(timeout)
            self._write(wire_text(message, verbatim=verbatim))
        [response] = await self._replies(1, timeout)
        if 200 <= response.code < 300:
            return response
        raise self._refusal(response)

    async def lmtp_data(
        self, message: bytes, count: int, *, timeout: float, verbatim: bool = False
    ) -> list[aiosmtplib.SMTPResponse]:
        """LMTP: DATA, the message, and one reply per accepted recipient (RFC 2033), in
        RCPT order. Fewer than `count` when the connection failed after some: those
        recipients were answered, the rest were not (the connection is closed)."""
        await self._start_data(timeout)
        self._write(wire_text(message, verbatim=verbatim))
        deadline = self._protocol_time() + timeout
        replies: list[aiosmtplib.SMTPResponse] = []
        for _ in range(count):
            try:
                replies += await self._replies(1, max(0.0, deadline - self._protocol_time()))
            except (aiosmtplib.SMTPException, OSError):
                if not replies:
                    raise
                break
        return replies

    def _protocol_time(self) -> float:
        protocol = self._protocol
        return protocol.loop.time() if protocol is not None else 0.0

    async def _start_data(self, timeout: float) -> None:
        """DATA, and its 354; SMTPDataError for a refusal (4xx, 5xx)."""
        start = await self.execute_command(b"DATA", timeout=timeout)
        if start.code != 354:
            raise self._refusal(start)

    def _refusal(self, response: aiosmtplib.SMTPResponse) -> aiosmtplib.SMTPException:
        """SMTPDataError for a 4xx or 5xx reply. Any other reply where a refusal could be
        (a 250 to DATA itself, a 1xx, a 3xx or no code at all at the end of data) says
        nothing of the message: the connection goes, and the caller answers 451."""
        if 400 <= response.code < 600:
            return aiosmtplib.SMTPDataError(response.code, response.message)
        self.close()
        return aiosmtplib.SMTPResponseException(
            -1, f"unexpected reply {response.code} {response.message[:100]}"
        )

    async def quit(self, *, timeout: float) -> None:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, ValueError):
            await self.execute_command(b"QUIT", timeout=timeout)
        self.close()

    def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()

    def _write(self, data: bytes) -> None:
        protocol = self._protocol
        if not self.is_connected:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        assert protocol is not None and protocol.transport is not None
        if protocol.waiting:
            # A command still waits for its reply (its task is being cancelled): what
            # would answer this one cannot be told apart from it.
            self.close()
            raise aiosmtplib.SMTPServerDisconnected("a command is still waiting for its reply")
        if protocol.buffer:
            # Something the next hop sent unasked (a 421 before it closed, say): no reply
            # read from here on could be trusted to answer what we send next.
            self.close()
            raise aiosmtplib.SMTPServerDisconnected("unexpected data from the next hop")
        protocol.transport.write(data)

    async def _replies(self, count: int, timeout: float) -> list[aiosmtplib.SMTPResponse]:
        protocol = self._protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        replies: list[aiosmtplib.SMTPResponse] = []
        deadline = protocol.loop.time() + timeout
        try:
            while True:
                while len(replies) < count:
                    reply = self._parse(protocol.buffer)
                    if reply is None:
                        break
                    replies.append(reply)
                if len(replies) == count:
                    return replies
                if protocol.error is not None:
                    raise protocol.error
                if protocol.ended:
                    raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                await protocol.more(deadline)
        except TimeoutError as exc:
            raise aiosmtplib.SMTPReadTimeoutError("no reply from the next hop") from exc
        finally:
            if len(replies) < count:
                # Given up (timeout, error, or the session ended while waiting): a reply
                # still to come would answer the wrong command, so the connection goes.
                self.close()

    @staticmethod
    def _parse(buffer: bytearray) -> aiosmtplib.SMTPResponse | None:
        """Take one complete reply off the front of `buffer`, if there is one."""
        end = buffer.find(b"\n")
        if end > 3 and buffer[3] == 0x20 and buffer[:3].isdigit():
            # The usual one-line reply, in one step.
            line = bytes(buffer[: end + 1])
            del buffer[: end + 1]
            text = line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape")
            return aiosmtplib.SMTPResponse(int(line[:3]), text)
        code, texts, offset = 0, [], 0
        while True:
            end = buffer.find(b"\n", offset)
            if end < 0:
                if len(buffer) - offset > _MAX_REPLY_LINE or offset > _MAX_REPLY:
                    raise aiosmtplib.SMTPResponseException(-1, "Response too long")
                return None
            line = bytes(buffer[offset : end + 1])
            offset = end + 1
            if len(line) < 4 or not line[:3].isdigit():
                raise aiosmtplib.SMTPResponseException(-1, f"bad reply {line[:100]!r}")
            code = int(line[:3])
            # "250Ok": a line without the space after its code is a last line all the
            # same (as aiosmtplib, smtplib and Postfix read it).
            text = line[4:] if line[3:4] in b" -" else line[3:]
            texts.append(text.strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
            if line[3:4] != b"-":
                break
            if offset > _MAX_REPLY:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        del buffer[:offset]
        return aiosmtplib.SMTPResponse(code, "\n".join(texts))
