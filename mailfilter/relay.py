"""The next hop: a small pool of aiosmtplib connections and one transaction at a time on each.

The worker proxies the envelope: MAIL and each RCPT are sent to the next hop when the
client sends them, and the next hop's answer is the client's answer. A recipient the next
hop refuses is therefore refused (4xx or 5xx) to the client at RCPT time, and the sending
MTA retries or bounces that recipient itself; the recipients the next hop accepted are the
only ones in the transaction, so the single end-of-data reply of SMTP covers exactly them.

Every failure to talk to the next hop (refused connection, timeout, lost connection)
becomes a 451 reply, so the client keeps the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiosmtplib

from mailfilter.stats import Stats

log = logging.getLogger(__name__)

# Characters that must never reach a command line of the next hop.
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")
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

    def lines(self) -> list[str]:
        parts = [_printable(p) for p in self.text.splitlines() if p.strip()] or ["Ok"]
        return parts

    def format(self, *, single_line: bool = False) -> str:
        """The reply as the client gets it (multi-line replies joined by CRLF)."""
        parts = self.lines()
        if single_line or len(parts) == 1:
            return f"{self.code} {' '.join(parts)}"
        return "\r\n".join(
            f"{self.code}{'-' if i < len(parts) - 1 else ' '}{p}" for i, p in enumerate(parts)
        )


def _printable(text: str) -> str:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text.strip())[:500]


def unavailable(reason: str) -> Reply:
    return Reply(451, f"4.4.1 Next hop unavailable ({reason}), try again later")


def xtext(value: str) -> str:
    """RFC 1891 xtext: `+XX` for '+', '=' and anything outside printable ASCII."""
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
    ) -> None:
        self.host = host
        self.port = port
        self.helo = helo
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.idle_timeout = idle_timeout
        self.stats = stats or Stats()
        self._slots = asyncio.Semaphore(max_backends)
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._closed = False

    async def begin(
        self,
        sender: str,
        *,
        size: int | None = None,
        eight_bit: bool = False,
        smtputf8: bool = False,
        xforward: Mapping[str, str] | None = None,
    ) -> tuple[Reply, Transaction | None]:
        """Open a transaction with MAIL FROM; the reply is the next hop's (or a 451)."""
        if _UNSAFE_ADDRESS.search(sender):
            return Reply(553, "5.1.7 Bad sender address syntax"), None
        self.stats.inc("next_hop_attempts")
        try:
            await asyncio.wait_for(self._slots.acquire(), self.connect_timeout)
        except TimeoutError:
            self.stats.inc("next_hop_failures", label="busy")
            return unavailable("all connections busy"), None
        # A pooled connection may have been closed by the next hop meanwhile: one retry
        # on a fresh connection.
        for attempt in (1, 2):
            client, reused = await self._connection(fresh=attempt == 2)
            if client is None:
                self._slots.release()
                self.stats.inc("next_hop_failures", label="connect")
                return unavailable("cannot connect"), None
            try:
                if xforward and client.supports_extension("xforward"):
                    await self._xforward(client, xforward)
                options = []
                if size is not None and client.supports_extension("size"):
                    options.append(f"SIZE={size}".encode())
                if eight_bit and client.supports_extension("8bitmime"):
                    options.append(b"BODY=8BITMIME")
                if smtputf8:
                    if not client.supports_extension("smtputf8"):
                        self._release(client, reusable=True)
                        return Reply(451, "4.5.0 Next hop does not support SMTPUTF8"), None
                    options.append(b"SMTPUTF8")
                response = await client.execute_command(
                    b"MAIL", b"FROM:<" + sender.encode("utf-8") + b">", *options,
                    timeout=self.command_timeout,
                )
            except (aiosmtplib.SMTPException, OSError) as exc:
                client.close()
                if reused and attempt == 1:
                    continue
                self._slots.release()
                self.stats.inc("next_hop_failures", label="mail")
                log.warning("next hop %s:%s failed at MAIL: %s", self.host, self.port, exc)
                return unavailable("lost connection"), None
            reply = Reply(response.code, response.message)
            if response.code == 421 and reused and attempt == 1:
                client.close()
                continue
            if not reply.ok:
                self.stats.inc("next_hop_failures", label="mail")
                await self._reset(client)
                return reply, None
            return reply, Transaction(self, client)
        raise AssertionError("unreachable")

    async def _connection(self, *, fresh: bool) -> tuple[aiosmtplib.SMTP | None, bool]:
        now = time.monotonic()
        while self._idle and not fresh:
            client, since = self._idle.pop()
            if now - since < self.idle_timeout and client.is_connected:
                return client, True
            await _quit(client)
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self.helo,
            timeout=self.command_timeout,
            start_tls=False,
            use_tls=False,
        )
        try:
            await client.connect(timeout=self.connect_timeout)
            await client.ehlo()
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.warning("next hop %s:%s: %s", self.host, self.port, exc)
            client.close()
            return None, False
        return client, False

    async def _xforward(self, client: aiosmtplib.SMTP, attrs: Mapping[str, str]) -> None:
        """Send the client's attributes the next hop asked for, in commands under 512 octets."""
        offered = set(client.esmtp_extensions.get("xforward", "").upper().split())
        items = [
            f"{name}={xtext(attrs[name])}"
            for name in XFORWARD_ATTRIBUTES
            if name in offered and attrs.get(name)
        ]
        command: list[str] = []
        for item in items:
            if command and len("XFORWARD " + " ".join([*command, item])) > 500:
                await client.execute_command(
                    b"XFORWARD", " ".join(command).encode(), timeout=self.command_timeout
                )
                command = []
            command.append(item)
        if command:
            await client.execute_command(
                b"XFORWARD", " ".join(command).encode(), timeout=self.command_timeout
            )

    async def _reset(self, client: aiosmtplib.SMTP) -> None:
        try:
            response = await client.execute_command(b"RSET", timeout=self.command_timeout)
        except (aiosmtplib.SMTPException, OSError):
            self._release(client, reusable=False)
            return
        self._release(client, reusable=response.code == 250)

    def _release(self, client: aiosmtplib.SMTP, *, reusable: bool) -> None:
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


async def _quit(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await client.quit(timeout=2)
    client.close()


class Transaction:
    """One MAIL transaction on a next-hop connection; ends with `data` or `abort`."""

    def __init__(self, relay: Relay, client: aiosmtplib.SMTP) -> None:
        self.relay = relay
        self.client: aiosmtplib.SMTP | None = client
        self.accepted: list[str] = []

    @property
    def open(self) -> bool:
        return self.client is not None

    async def rcpt(self, address: str) -> Reply:
        client = self.client
        if client is None:
            return unavailable("transaction closed")
        if _UNSAFE_ADDRESS.search(address):
            return Reply(553, "5.1.3 Bad recipient address syntax")
        try:
            response = await client.execute_command(
                b"RCPT", b"TO:<" + address.encode("utf-8") + b">",
                timeout=self.relay.command_timeout,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.warning("next hop failed at RCPT: %s", exc)
            self._finish(reusable=False)
            self.relay.stats.inc("next_hop_failures", label="rcpt")
            return unavailable("lost connection")
        reply = Reply(response.code, response.message)
        if reply.ok:
            self.accepted.append(address)
        return reply

    async def data(self, message: bytes) -> Reply:
        """Send the message; the reply is the next hop's end-of-data reply, or a 451."""
        client = self.client
        if client is None:
            return unavailable("transaction closed")
        try:
            response = await client.data(message, timeout=self.relay.data_timeout)
        except aiosmtplib.SMTPDataError as exc:
            self.relay.stats.inc("next_hop_failures", label="data")
            await self._abort_after_refusal()
            return Reply(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError) as exc:
            # No reply to the end of data: whether the next hop kept the message is
            # unknown, and a 451 lets the client try again (at worst a duplicate).
            log.warning("next hop failed at DATA: %s", exc)
            self.relay.stats.inc("next_hop_failures", label="data")
            self._finish(reusable=False)
            return unavailable("no reply to the message")
        self._finish(reusable=True)
        return Reply(response.code, response.message)

    async def _abort_after_refusal(self) -> None:
        client = self.client
        if client is None:
            return
        self.client = None
        await self.relay._reset(client)

    async def abort(self) -> None:
        """End the transaction without sending the message (RSET, back to the pool)."""
        client = self.client
        if client is None:
            return
        self.client = None
        await self.relay._reset(client)

    def _finish(self, *, reusable: bool) -> None:
        client = self.client
        if client is None:
            return
        self.client = None
        self.relay._release(client, reusable=reusable)
