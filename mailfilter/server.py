"""The SMTP side of the worker: an aiosmtpd server with limits, and the handler that acts.

`FilterHandler` is a plain aiosmtpd handler (handle_EHLO/MAIL/RCPT/RSET hooks plus
`finish_data`, called once a message was read). `FilterSMTP`/`FilterLMTP` add what
aiosmtpd leaves to its users: connection limits, a command budget, command lines with CR or
NUL refused, a DATA reader with bounded memory and a bare CR/LF policy, a data timeout with
a minimum rate, a 421 on timeout, and XFORWARD. `FilterServer` owns sockets and lifecycle.

Never lose mail: the end of DATA is answered only after the next hop answered (pass) or
the quarantine sink returned (discard, bounce); any failure on the way is a 451.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from email.utils import formatdate
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailfilter.config import ConfigError, FilterConfig
from mailfilter.data import (
    BARE_LINE_END,
    NOMINAL,
    TOO_BIG,
    TOO_LONG,
    TOO_MANY_HEADERS,
    DataAccumulator,
    DataLimits,
)
from mailfilter.front import RelayRecipients
from mailfilter.interfaces import DEFAULT_PROFILE, Profile, QuarantineSink, RecipientLookup
from mailfilter.policy import Envelope as PolicyEnvelope
from mailfilter.policy import Policy, ProfilePolicy, TemporaryFailure, Verdict
from mailfilter.relay import XFORWARD_ATTRIBUTES, Relay, Reply, Transaction
from mailfilter.stats import Stats, serve_metrics

log = logging.getLogger(__name__)

_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9._:\[\]-]")
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
# RFC 3461 xtext: printable ASCII but '+' and '=', or '+' and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")
# The usual form of a MAIL/RCPT path: <dot-atom@host.name>, then the parameters.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?=[ \t]|$)"
)
_DSN_MAIL = ("RET", "ENVID")
_DSN_RCPT = ("NOTIFY", "ORCPT")

REFUSALS = {
    TOO_BIG: "552 5.3.4 Message size exceeds fixed maximum message size",
    TOO_LONG: "500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)",
    TOO_MANY_HEADERS: "552 5.6.0 Too many header fields",
    BARE_LINE_END: "550 5.6.0 Message contains bare CR or LF (see RFC 5321 2.3.8)",
}
TEMPFAIL = "451 4.3.0 Temporary failure, please try again later"
# DATA is read in chunks of up to this many octets (whatever has arrived).
_DATA_READ_SIZE = 64 * 1024


class FilterEnvelope(Envelope):
    """aiosmtpd's envelope plus what the worker keeps for one transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.relay: Transaction | None = None
        self.profile: Profile | None = None
        self.xforward: dict[str, str] | None = None
        self.eight_bit_declared = False
        # RFC 3461 parameters of MAIL, and of the RCPT being handled, passed on as sent.
        self.dsn_mail: list[str] = []
        self.dsn_rcpt: list[str] = []
        # What the policy started at the first accepted RCPT (its DNS queries), handed to
        # its decide() after DATA and cancelled when the transaction ends without one.
        self.prepared: Any = None


class ConnectionGate:
    """Connections at the same time, in total and per client address."""

    def __init__(self, *, max_clients: int, max_per_ip: int) -> None:
        self.max_clients = max_clients
        self.max_per_ip = max_per_ip
        self.total = 0
        self.by_ip: collections.Counter[str] = collections.Counter()

    def admit(self, ip: str) -> str | None:
        """None when admitted, else the reason for refusing."""
        if self.total >= self.max_clients:
            return "total"
        if self.max_per_ip and self.by_ip[ip] >= self.max_per_ip:
            return "per_ip"
        self.total += 1
        self.by_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        self.by_ip[ip] -= 1
        if self.by_ip[ip] <= 0:
            del self.by_ip[ip]


class FilterHandler:
    """What the worker does with each step of a transaction."""

    def __init__(
        self,
        config: FilterConfig,
        *,
        relay: Relay,
        sink: QuarantineSink,
        policy: Policy | None = None,
        lookup: RecipientLookup | None = None,
        stats: Stats | None = None,
        relay_profile: Profile | None = None,
    ) -> None:
        self.config = config
        self.relay_profile = relay_profile or Profile("relay")
        self.recipients = (
            RelayRecipients(map_path=config.relay_map_path, domains=config.relay_domains)
            if config.relay_map_path or config.relay_domains else None
        )
        self.relay = relay
        self.sink = sink
        self.policy = policy or ProfilePolicy()
        self.lookup = lookup
        self.stats = stats or Stats()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.config.xforward_allowed(_peer_ip(session)):
            responses.insert(-1, "250-XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
        responses.insert(-1, "250-ENHANCEDSTATUSCODES")
        responses.insert(-1, "250-DSN")
        return responses

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: FilterEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        size = None
        for option in mail_options:
            if option.startswith("SIZE="):
                size = int(option[5:])
        eight_bit = "BODY=8BITMIME" in mail_options
        reply, transaction = await self.relay.begin(
            _reverse_path(address),
            size=size,
            eight_bit=eight_bit,
            smtputf8=envelope.smtp_utf8,
            xforward=self._client_attributes(session, envelope),
            dsn=envelope.dsn_mail,
        )
        if transaction is None:
            return reply.format()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.eight_bit_declared = eight_bit
        envelope.relay = transaction
        return reply.format()

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: FilterEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            self.stats.inc("protocol_errors", label="too_many_recipients")
            return "452 4.5.3 Error: too many recipients"
        if self.config.next_hop_lmtp and not self.config.lmtp and envelope.rcpt_tos:
            # The next hop answers per recipient, the client hears one reply: with one
            # recipient per transaction that reply is exact (Postfix:
            # transport_destination_recipient_limit = 1 avoids the wait for the retry).
            return "452 4.5.3 Error: one recipient per message here, send the others again"
        profile: Profile | None = DEFAULT_PROFILE
        if self._relay_client(session, envelope):
            # A client allowed to relay sends anywhere (front mode), under the relay profile.
            profile = self._relay_profile()
        elif self.config.mode == "front" and self.recipients is not None and (
            not self.recipients.accepts(address)
        ):
            self.stats.inc("protocol_errors", label="relay_denied")
            return f"554 5.7.1 <{address}>: Relay access denied"
        elif self.lookup is not None:
            profile = await self.lookup.profile_for(address)
        if profile is None:
            if self.config.mode == "front":
                return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
            profile = DEFAULT_PROFILE
        if envelope.profile is not None and profile.name != envelope.profile.name:
            # One transaction carries one profile; the client sends this one on its own.
            return f"451 4.5.3 <{address}>: different filter profile, send it separately"
        if envelope.relay is None:
            return "503 5.5.1 Error: need MAIL command"
        reply = await envelope.relay.rcpt(address, dsn=envelope.dsn_rcpt)
        if reply.ok:
            first = not envelope.rcpt_tos
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            envelope.profile = profile
            if first:
                self._prepare(session, envelope, profile)
        return reply.format()

    def _prepare(self, session: Session, envelope: FilterEnvelope, profile: Profile) -> None:
        """Let the policy start what needs only the envelope (DNS queries) now."""
        prepare = getattr(self.policy, "prepare", None)
        if prepare is None or envelope.prepared is not None:
            return
        try:
            envelope.prepared = prepare(self._facts(session, envelope), profile)
        except Exception:
            # decide() starts them itself after DATA.
            log.exception("policy could not prepare the transaction's checks")

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok"

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would answer 500: a failure of ours (a lookup that cannot be reached,
        # say) must make the client try again, not bounce.
        log.error("session error: %r", error, exc_info=error)
        self.stats.inc("protocol_errors", label="internal_error")
        return TEMPFAIL

    def _client_attributes(self, session: Session, envelope: FilterEnvelope) -> dict[str, str]:
        """What the next hop's XFORWARD gets: the upstream client if a trusted peer told us,
        else our own peer."""
        if envelope.xforward is not None:
            return {k: v for k, v in envelope.xforward.items() if v}
        peer = session.peer or ("", 0)
        return {
            "ADDR": str(peer[0]),
            "PORT": str(peer[1]) if len(peer) > 1 else "",
            "NAME": "[UNAVAILABLE]",
            "HELO": session.host_name or "",
            "PROTO": "ESMTP" if session.extended_smtp else "SMTP",
            "SOURCE": "REMOTE",
        }

    async def finish_data(
        self,
        server: SMTP,
        session: Session,
        envelope: FilterEnvelope,
        content: bytes,
        *,
        lmtp: bool,
    ) -> str:
        """The reply to the end of DATA, given only once the message is safe."""
        transaction = envelope.relay
        envelope.relay = None
        prepared, envelope.prepared = envelope.prepared, None
        recipients = list(envelope.rcpt_tos)
        self.stats.inc("messages_received")
        reply: Reply | list[Reply]
        try:
            reply = await self._act(session, envelope, transaction, content, prepared)
        except Exception:
            log.exception("unexpected failure after DATA; answering 451")
            self.stats.inc("messages_tempfailed", label="error")
            reply = Reply(451, "4.3.0 Temporary failure, please try again later")
        replies = reply if isinstance(reply, list) else [reply] * max(1, len(recipients))
        if not all(r.ok for r in replies):
            with contextlib.suppress(Exception):
                if transaction is not None:
                    await transaction.abort()
        if lmtp:
            # RFC 2033: one reply per accepted recipient, in RCPT order.
            return "\r\n".join(r.format(single_line=True) for r in replies)
        return replies[0].format()

    async def _act(
        self,
        session: Session,
        envelope: FilterEnvelope,
        transaction: Transaction | None,
        content: bytes,
        prepared: Any = None,
    ) -> Reply | list[Reply]:
        if transaction is None:
            if prepared is not None:
                prepared.cancel()
            return Reply(451, "4.4.1 Next hop transaction lost, try again later")
        profile = envelope.profile or DEFAULT_PROFILE
        facts = self._facts(session, envelope)
        try:
            if prepared is not None:
                verdict = await self.policy.decide(  # type: ignore[call-arg]
                    content, facts, profile, prepared=prepared
                )
            else:
                verdict = await self.policy.decide(content, facts, profile)
        except TemporaryFailure as failure:
            # A scanner that is down, or checks out of time: the sender keeps the message.
            log.warning("content checks could not decide: %s", failure)
            self.stats.inc("messages_tempfailed", label=failure.label)
            return Reply(451, f"4.3.0 Temporary failure in content checks ({failure.label}), "
                         "try again later")
        except Exception:
            # A check that cannot decide must not let the message through unchecked.
            log.exception("policy failed; answering 451")
            self.stats.inc("messages_tempfailed", label="policy")
            return Reply(451, "4.3.0 Temporary failure in content checks, try again later")
        size = len(content)
        if verdict.destiny == "pass":
            relayed = content if verdict.message is None else verdict.message
            message = self._top_headers(session, envelope, verdict) + relayed
            if self.config.next_hop_lmtp:
                return self._count_lmtp(await transaction.data_per_recipient(message), size)
            reply = await transaction.data(message)
            if reply.ok:
                self.stats.inc("messages_passed")
                self.stats.inc("bytes_accepted", size)
                return reply
            if reply.temporary or reply.code < 400:
                self.stats.inc("messages_tempfailed", label="next_hop")
                return Reply(451, f"4.4.0 Next hop said: {' '.join(reply.lines())}")
            self.stats.inc("messages_rejected", label="next_hop")
            self.stats.inc("bytes_rejected", size)
            return reply
        await transaction.abort()
        category = verdict.category or "CLEAN"
        reason = verdict.summary or "; ".join(verdict.reasons) or category
        detail = _status_detail(verdict)
        if verdict.destiny == "reject":
            self.stats.inc("messages_rejected", label=category)
            self.stats.inc("bytes_rejected", size)
            return Reply(554, f"5.{detail} Rejected: {reason}")
        try:
            mail_id = await self.sink.write(
                category=verdict.category or "BADH",
                message=content,
                sender=_reverse_path(envelope.mail_from or ""),
                recipients=list(envelope.rcpt_tos),
                reasons=list(verdict.reasons),
                headers=list(verdict.quarantine_headers),
            )
        except Exception:
            log.exception("quarantine failed; answering 451")
            self.stats.inc("messages_tempfailed", label="quarantine")
            return Reply(451, "4.3.0 Cannot keep a copy of the message now, try again later")
        self.stats.inc("messages_quarantined", label=category)
        self.stats.inc("bytes_accepted", size)
        if verdict.summary:
            # amavisd-new's texts: "id=... - INFECTED: name", "- BANNED: ...", "- spam".
            if verdict.destiny == "bounce":
                return Reply(554, f"5.{detail} Bounce, id={mail_id} - {verdict.summary}")
            return Reply(250, f"2.{detail} Ok, discarded, id={mail_id} - {verdict.summary}")
        if verdict.destiny == "bounce":
            return Reply(554, f"5.{detail} Rejected, id={mail_id} - {category}: {reason}")
        return Reply(250, f"2.{detail} Ok, discarded, id={mail_id} - {category}")

    def _count_lmtp(self, replies: list[Reply], size: int) -> list[Reply]:
        """Per-recipient next-hop replies, counted, with anything but 2xx/5xx made 451."""
        out = []
        for reply in replies:
            if reply.ok:
                out.append(reply)
            elif reply.code >= 500:
                out.append(reply)
            else:
                out.append(Reply(451, f"4.4.0 Next hop said: {' '.join(reply.lines())}"))
        if any(r.ok for r in out):
            self.stats.inc("messages_passed")
            self.stats.inc("bytes_accepted", size)
        elif all(r.code >= 500 for r in out):
            self.stats.inc("messages_rejected", label="next_hop")
            self.stats.inc("bytes_rejected", size)
        else:
            self.stats.inc("messages_tempfailed", label="next_hop")
        return out

    def _facts(self, session: Session, envelope: FilterEnvelope) -> PolicyEnvelope:
        peer = session.peer or ("", 0)
        return PolicyEnvelope(
            sender=_reverse_path(envelope.mail_from or ""),
            recipients=tuple(envelope.rcpt_tos),
            client_address=str(peer[0]),
            helo=session.host_name or "",
            smtputf8=envelope.smtp_utf8,
            relay_client=self._relay_client(session, envelope),
        )

    def _relay_client(self, session: Session, envelope: FilterEnvelope) -> bool:
        """The client is one of FILTER_RELAY_IPS: our own, sending out. In front mode the
        peer itself; behind Postfix the client Postfix named in XFORWARD."""
        if self.config.mode == "front":
            return self.config.relay_allowed(_peer_ip(session))
        forwarded = (envelope.xforward or {}).get("ADDR", "")
        return bool(forwarded) and self.config.relay_allowed(forwarded)

    def _relay_profile(self) -> Profile:
        choose = getattr(self.lookup, "relay_profile", None)
        chosen = choose() if callable(choose) else None
        return chosen or self.relay_profile

    def _top_headers(self, session: Session, envelope: FilterEnvelope, verdict: Verdict) -> bytes:
        """The only change made to a passed message: header fields put on top."""
        peer = session.peer or ("", 0)
        helo = _HELO_UNSAFE.sub("?", session.host_name or "unknown")[:255]
        client = f"[{peer[0]}]"
        if envelope.xforward:
            # A trusted peer (Postfix) told us who its client was: name that client.
            forwarded = envelope.xforward
            helo = _HELO_UNSAFE.sub("?", forwarded.get("HELO") or "unknown")[:255]
            name = _HELO_UNSAFE.sub("?", forwarded.get("NAME") or "unknown")[:255]
            client = f"{name} [{_HELO_UNSAFE.sub('?', forwarded.get('ADDR') or '')}]"
        if isinstance(session, _LMTPSession):
            proto = "LMTP"
        else:
            proto = "ESMTP" if session.extended_smtp else "SMTP"
        if envelope.smtp_utf8:
            proto = "UTF8" + ("SMTP" if proto != "LMTP" else "LMTP")
        local_id = secrets.token_hex(6)
        received = (
            f"Received: from {helo} ({client})\r\n"
            f"\tby {self.config.hostname} (spamviewer) with {proto} id {local_id}"
        )
        if len(envelope.rcpt_tos) == 1 and len(envelope.rcpt_tos[0]) < 200:
            received += f"\r\n\tfor <{envelope.rcpt_tos[0]}>"
        received += f";\r\n\t{formatdate(localtime=False)}\r\n"
        block = received.encode("utf-8", "replace")
        for name, value in verdict.headers:
            clean = " ".join(value.replace("\0", " ").split())
            block += f"{name}: {clean}\r\n".encode("utf-8", "replace")
        return block


class _LMTPSession(Session):
    pass


def _reverse_path(address: str) -> str:
    """aiosmtpd gives the null reverse-path (bounces) as "<>"; the empty string here."""
    return "" if address == "<>" else address


def _peer_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""


def _dsn_value_ok(name: str, value: str) -> bool:
    if name == "RET":
        return value.upper() in ("FULL", "HDRS")
    if name == "NOTIFY":
        words = value.upper().split(",")
        if words == ["NEVER"]:
            return True
        return len(set(words)) == len(words) and set(words) <= {"SUCCESS", "FAILURE", "DELAY"}
    if name == "ENVID":
        return len(value) <= 100 and bool(_XTEXT.fullmatch(value))
    # ORCPT=addr-type;xtext
    kind, sep, address = value.partition(";")
    return (
        bool(sep)
        and kind.isascii()
        and kind.replace("-", "").isalnum()
        and len(value) <= 500
        and bool(_XTEXT.fullmatch(address))
    )


def _xtext_decode(value: str) -> str:
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)


class _FilterProtocol:
    """Mixed into aiosmtpd's SMTP or LMTP class; see the module docstring."""

    event_handler: FilterHandler
    # aiosmtpd's class-level dict grows by 36 octets at every EHLO and is shared by all
    # instances; each session gets its own here.
    command_size_limits: dict[str, int]

    def __init__(
        self,
        handler: FilterHandler,
        *,
        config: FilterConfig,
        gate: ConnectionGate,
        stats: Stats,
        registry: set,
        **kwargs: Any,
    ) -> None:
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(  # type: ignore[call-arg]
            handler,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.hostname,
            ident=config.banner,
            timeout=config.command_timeout,
            **kwargs,
        )
        self.config = config
        self._gate = gate
        self._stats = stats
        self._registry = registry
        self._gate_ip: str | None = None
        self._refused = False
        self._commands = 0
        self._background: set[asyncio.Task] = set()

    # Connections ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._gate_ip is None and not self._refused:
            peer = transport.get_extra_info("peername")
            ip = str(peer[0]) if peer else ""
            reason = self._gate.admit(ip)
            if reason is not None:
                self._refused = True
                self._stats.inc("connections_refused", label=reason)
                # (uvloop's transports are not asyncio.WriteTransport subclasses.)
                transport.write(  # type: ignore[attr-defined]
                    f"421 4.7.0 {self.config.hostname} Error: too many connections"
                    f"{' from your address' if reason == 'per_ip' else ''}\r\n".encode()
                )
                transport.close()
                return
            self._gate_ip = ip
            self._stats.inc("connections")
            self._registry.add(self)
        super().connection_made(transport)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)  # type: ignore[misc]

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        if self._gate_ip is not None:
            self._gate.release(self._gate_ip)
            self._gate_ip = None
            self._registry.discard(self)
        self._drop_transaction(self.envelope)
        super().connection_lost(exc)  # type: ignore[misc]

    def _timeout_cb(self) -> None:
        self._stats.inc("protocol_errors", label="timeout")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(
                f"421 4.4.2 {self.config.hostname} Error: timeout exceeded\r\n".encode()
            )
        super()._timeout_cb()  # type: ignore[misc]

    # Transactions ---------------------------------------------------------------------
    def _create_envelope(self) -> Envelope:
        return FilterEnvelope()

    def _set_post_data_state(self) -> None:
        # RSET, HELO/EHLO and the end of DATA all start a new envelope: a next-hop
        # transaction still open on the old one is ended first.
        self._drop_transaction(getattr(self, "envelope", None))
        super()._set_post_data_state()  # type: ignore[misc]

    def _drop_transaction(self, envelope: Envelope | None) -> None:
        prepared = getattr(envelope, "prepared", None)
        if prepared is not None:
            envelope.prepared = None  # type: ignore[union-attr]
            prepared.cancel()
        relay = getattr(envelope, "relay", None)
        if relay is None:
            return
        envelope.relay = None  # type: ignore[union-attr]
        task = asyncio.get_event_loop().create_task(relay.abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # Commands -------------------------------------------------------------------------
    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: Any) -> None:
        super()._cb_client_connected(reader, writer)  # type: ignore[misc]
        read_line = reader.readuntil

        async def read_command(separator: bytes = b"\n") -> bytes:
            if separator != b"\n":
                return await read_line(separator)
            while True:
                line = await read_line(separator)
                self._commands += 1
                if self._commands > self.config.max_commands:
                    self._stats.inc("protocol_errors", label="too_many_commands")
                    await self.push("421 4.7.0 Error: too many commands, closing connection")
                    self.transport.close()
                    raise asyncio.CancelledError
                body = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")
                if b"\r" in body or b"\0" in body:
                    # One line is one command: a CR inside must not act as a line end
                    # anywhere downstream.
                    self._stats.inc("protocol_errors", label="cr_in_command")
                    await self.push("501 5.5.2 Syntax error: CR or NUL in command line")
                    continue
                if self.config.bare_lf == "reject" and not line.endswith(b"\r\n"):
                    self._stats.inc("protocol_errors", label="bare_lf")
                    await self.push("501 5.5.2 Syntax error: command not ended by CRLF")
                    continue
                return line

        reader.readuntil = read_command  # type: ignore[method-assign]

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parse of a path (the email package's RFC 5322 parser, tens of
        microseconds a call), with a shortcut for the usual `<dot-atom@host.name>` that
        gives the same address and parameters."""
        if arg and not self.local_part_limit:  # type: ignore[attr-defined]
            match = _SIMPLE_PATH.match(arg)
            if match is not None:
                rest = arg[match.end() :].lstrip(" \t")
                if not rest.startswith("("):
                    return match.group(1), rest
        return super()._getaddr(arg)  # type: ignore[misc]

    async def smtp_MAIL(self, arg: str) -> None:
        """MAIL with RFC 3461 RET/ENVID taken out (aiosmtpd refuses any parameter it does
        not know), checked, and kept for the next hop."""
        rest, dsn = await self._take_dsn(arg, _DSN_MAIL)
        if rest is None:
            return
        if self.envelope is not None:
            self.envelope.dsn_mail = dsn  # type: ignore[attr-defined]
        await super().smtp_MAIL(rest)  # type: ignore[misc]

    async def smtp_RCPT(self, arg: str) -> None:
        rest, dsn = await self._take_dsn(arg, _DSN_RCPT)
        if rest is None:
            return
        if self.envelope is not None:
            self.envelope.dsn_rcpt = dsn  # type: ignore[attr-defined]
        await super().smtp_RCPT(rest)  # type: ignore[misc]

    async def _take_dsn(self, arg: str, names: tuple[str, ...]) -> tuple[str | None, list[str]]:
        if not arg or self.session is None or not self.session.extended_smtp:
            return arg, []
        end = arg.rfind(">")
        if end >= 0:
            head, tail = arg[: end + 1], arg[end + 1 :]
        else:
            head, _, tail = arg.partition(" ")
        kept: list[str] = []
        dsn: list[str] = []
        seen: set[str] = set()
        for token in tail.split():
            name, _, value = token.partition("=")
            name = name.upper()
            if name not in names:
                kept.append(token)
                continue
            if name in seen or not _dsn_value_ok(name, value):
                await self.push(f"501 5.5.4 Syntax error in {name} parameter")  # type: ignore[attr-defined]
                return None, []
            seen.add(name)
            dsn.append(f"{name}={value.upper() if name in ('RET', 'NOTIFY') else value}")
        return " ".join([head, *kept]), dsn

    async def smtp_EHLO(self, hostname: str) -> None:
        self.command_size_limits.clear()
        await super().smtp_EHLO(hostname)  # type: ignore[misc]

    async def smtp_STARTTLS(self, arg: str) -> None:
        self._stats.inc("tls_attempts")
        await super().smtp_STARTTLS(arg)  # type: ignore[misc]

    async def smtp_XFORWARD(self, arg: str) -> None:
        """Postfix's XFORWARD (for logging and the next hop only), from trusted peers."""
        assert self.session is not None and self.envelope is not None
        if not self.config.xforward_allowed(_peer_ip(self.session)):
            await self.push("550 5.7.0 Error: insufficient authorization")
            return
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        pairs = (arg or "").split()
        parsed = {}
        for pair in pairs:
            name, sep, value = pair.partition("=")
            name = name.upper()
            decoded = _xtext_decode(value)
            if (
                not sep
                or name not in XFORWARD_ATTRIBUTES
                or len(decoded) > 255
                or not all(33 <= ord(ch) <= 126 for ch in decoded)
            ):
                await self.push("501 5.5.4 Syntax: XFORWARD attribute=value...")
                return
            parsed[name] = decoded
        if not parsed:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value...")
            return
        envelope: FilterEnvelope = self.envelope  # type: ignore[assignment]
        if envelope.xforward is None:
            envelope.xforward = dict.fromkeys(XFORWARD_ATTRIBUTES, "")
        for name, value in parsed.items():
            envelope.xforward[name] = "" if value.upper() == "[UNAVAILABLE]" else value
        await self.push("250 2.0.0 Ok")

    # DATA -----------------------------------------------------------------------------
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():  # type: ignore[attr-defined]
            return
        assert self.envelope is not None and self.session is not None
        envelope: FilterEnvelope = self.envelope  # type: ignore[assignment]
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if self._reader._buffer:  # type: ignore[attr-defined]
            # Message text sent before our 354 (or before the replies to MAIL/RCPT): if
            # DATA failed those lines would be read as commands. Postfix calls this
            # "SMTP protocol synchronization"; the session ends here.
            self._stats.inc("protocol_errors", label="pipelining")
            await self.push("554 5.5.0 Error: SMTP protocol synchronization")
            self.transport.close()
            return
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        accumulator = DataAccumulator(
            DataLimits(
                max_size=self.config.max_message_size,
                max_line_length=self.config.max_line_length,
                max_header_count=self.config.max_header_count,
                normalise_bare=self.config.bare_lf == "normalise",
            )
        )
        started = time.monotonic()
        reader = self._reader
        while True:
            self._reset_timeout(self.config.data_timeout)  # type: ignore[attr-defined]
            chunk = await reader.read(_DATA_READ_SIZE)
            if not chunk:
                self.transport.close()
                return
            end = accumulator.feed(chunk)
            if end >= 0:
                if end < len(chunk):
                    # Sent after the end of data without waiting for its reply: commands,
                    # read as such once the reply is out (as a line reader leaves them).
                    reader._buffer[:0] = chunk[end:]  # type: ignore[attr-defined]
                break
            if self.config.min_data_rate:
                allowed = self.config.data_timeout + accumulator.size / self.config.min_data_rate
                if time.monotonic() - started > allowed:
                    self._stats.inc("protocol_errors", label="slow_data")
                    await self.push("421 4.4.2 Error: data too slow, closing connection")
                    self.transport.close()
                    return
        self._reset_timeout()  # type: ignore[attr-defined]
        self._stats.inc("bytes_received", accumulator.size)
        if accumulator.bare_seen:
            self._stats.inc("protocol_errors", label="bare_cr_lf")
        if accumulator.eight_bit and not envelope.eight_bit_declared:
            self._stats.inc("protocol_errors", label="8bit_undeclared")
        if accumulator.state != NOMINAL:
            self._stats.inc("messages_rejected", label=accumulator.state)
            self._stats.inc("bytes_rejected", accumulator.size)
            self._set_post_data_state()
            await self.push(REFUSALS[accumulator.state])
            return
        content = accumulator.content()
        del accumulator
        status = await self.event_handler.finish_data(
            self, self.session, envelope, content, lmtp=isinstance(self, LMTP)
        )
        self._commands = 0
        self._set_post_data_state()
        await self.push(status)


class FilterSMTP(_FilterProtocol, SMTP):
    pass


class FilterLMTP(_FilterProtocol, LMTP):
    def _create_session(self) -> Session:
        return _LMTPSession(self.loop)


class FilterServer:
    """The listening worker: `await start()`, `await stop()` (or `serve_forever()`)."""

    def __init__(
        self,
        config: FilterConfig,
        *,
        sink: QuarantineSink,
        policy: Policy | None = None,
        lookup: RecipientLookup | None = None,
        stats: Stats | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """`sock`: an already bound listening socket (runfilter binds before it drops
        privileges, and gives each of FILTER_PROCESSES its own SO_REUSEPORT socket)."""
        if config.mode == "front" and lookup is None and not (
            config.relay_map_path or config.relay_domains
        ):
            raise ConfigError(
                "FILTER_MODE=front needs FILTER_RELAY_MAP or FILTER_RELAY_DOMAINS: "
                "without them no recipient would be refused (an open relay)"
            )
        self.sock = sock
        self.config = config
        self.sink = sink
        self.policy = policy
        self.lookup = lookup
        self.stats = stats or Stats()
        self.gate = ConnectionGate(max_clients=config.max_clients, max_per_ip=config.max_per_ip)
        self._server: asyncio.Server | None = None
        self._metrics: asyncio.Server | None = None
        self._sessions: set = set()
        self.relay: Relay | None = None
        self.handler: FilterHandler | None = None

    async def start(self) -> None:
        quiet_protocol_log()
        loop = asyncio.get_running_loop()
        self.relay = Relay(
            self.config.next_hop_host,
            self.config.next_hop_port,
            helo=self.config.hostname,
            max_backends=self.config.max_backends,
            connect_timeout=self.config.relay_connect_timeout,
            command_timeout=self.config.relay_command_timeout,
            data_timeout=self.config.relay_data_timeout,
            idle_timeout=self.config.relay_idle_timeout,
            stats=self.stats,
            lmtp=self.config.next_hop_lmtp,
        )
        self.handler = FilterHandler(
            self.config,
            relay=self.relay,
            sink=self.sink,
            policy=self.policy,
            lookup=self.lookup,
            stats=self.stats,
        )
        protocol = FilterLMTP if self.config.lmtp else FilterSMTP

        tls = tls_context(self.config)

        def factory() -> asyncio.Protocol:
            return protocol(
                self.handler,
                config=self.config,
                gate=self.gate,
                stats=self.stats,
                registry=self._sessions,
                loop=loop,
                tls_context=tls,
            )

        if self.sock is not None:
            self._server = await loop.create_server(factory, sock=self.sock)
        else:
            self._server = await loop.create_server(
                factory, self.config.listen_host, self.config.listen_port,
                reuse_address=True, reuse_port=self.config.processes > 1,
            )
        if self.config.metrics_enabled:
            self._metrics = await serve_metrics(
                self.stats, self.config.metrics_host, self.config.metrics_port
            )
        log.info("filter listening on %s:%s", self.config.listen_host, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def metrics_port(self) -> int:
        assert self._metrics is not None
        return self._metrics.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for server in (self._server, self._metrics):
            if server is not None:
                server.close()
        sessions = list(self._sessions)
        for session in sessions:
            if session.transport is not None:
                session.transport.close()
        for server in (self._server, self._metrics):
            if server is not None:
                await server.wait_closed()
        # Sessions end (connection_lost runs, handlers are cancelled) and the next-hop
        # transactions they still held are ended before the pool closes.
        await asyncio.sleep(0)
        tasks = []
        for session in sessions:
            tasks.extend(session._background)
            if session._handler_coroutine is not None:
                tasks.append(session._handler_coroutine)
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self.relay is not None:
            await self.relay.close()

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.stop()


def _status_detail(verdict) -> str:
    """The enhanced status code's subject and detail, as amavisd-new answers: 6.3 for 8-bit
    data in a header, 6.0 for other bad headers (a media error), 7.0 (policy) otherwise."""
    if verdict.category == "BADH":
        names = {f.name for f in verdict.findings}
        return "6.3" if "8bit-in-header" in names else "6.0"
    return "7.0"


def run_worker(main: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run, on uvloop's event loop when uvloop can be imported (it takes a good
    part of the event loop's own cost off each message), on asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def quiet_protocol_log() -> None:
    """aiosmtpd logs every connection and command at INFO on `mail.log`, several lines a
    message: kept for LOG_LEVEL=DEBUG (root logger at DEBUG), else warnings only. A level
    set on `mail.log` explicitly is left alone."""
    protocol_log = logging.getLogger("mail.log")
    if protocol_log.level == logging.NOTSET and not logging.getLogger().isEnabledFor(
        logging.DEBUG
    ):
        protocol_log.setLevel(logging.WARNING)


def tls_context(config: FilterConfig) -> ssl.SSLContext | None:
    """The server side of STARTTLS, when a certificate is configured."""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"FILTER_TLS_CERT/FILTER_TLS_KEY: cannot load them: {exc}") from exc
    return context


def listening_sockets(config: FilterConfig) -> list[socket.socket]:
    """FILTER_PROCESSES sockets bound to the same address with SO_REUSEPORT (the kernel
    spreads connections over them); a port of 0 is resolved by the first."""
    family = socket.AF_INET6 if ":" in config.listen_host else socket.AF_INET
    sockets: list[socket.socket] = []
    port = config.listen_port
    try:
        for _ in range(config.processes):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if config.processes > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((config.listen_host, port))
            port = sock.getsockname()[1]
            sock.listen(1024)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class ServerThread:
    """Runs an object with `async start()`/`async stop()` on an event loop in a thread.

    For tests and benchmarks that drive the worker with blocking clients.
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Any = None

    def start(self) -> Any:
        self._thread.start()

        async def _start() -> Any:
            server = self._make()
            await server.start()
            return server

        self.server = self.run(_start())
        return self.server

    def run(self, coro: Awaitable[Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def call(self, func: Callable[[], Any], timeout: float = 30) -> Any:
        async def _call() -> Any:
            return func()

        return self.run(_call(), timeout)

    def stop(self) -> None:
        async def _shutdown() -> None:
            try:
                if self.server is not None:
                    await self.server.stop()
            finally:
                # Whatever the server left running (sessions winding down, aborts on the
                # next hop) gets a moment to finish, then is cancelled.
                current = asyncio.current_task()
                pending = [t for t in asyncio.all_tasks() if t is not current]
                if pending:
                    _, late = await asyncio.wait(pending, timeout=5)
                    for task in late:
                        task.cancel()
                    await asyncio.gather(*late, return_exceptions=True)
                await self.loop.shutdown_asyncgens()
                await self.loop.shutdown_default_executor()

        try:
            self.run(_shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if not self.loop.is_running():
                self.loop.close()
