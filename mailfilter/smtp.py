"""The worker's SMTP and LMTP server side: one asyncio protocol object per connection.

`SMTPServerProtocol` parses command lines from the bytes as they arrive and answers
them in order. Commands that need nothing but the session (EHLO, NOOP, RSET, XFORWARD,
...) are answered at once, and the replies to pipelined commands go out in one write.
Only RCPT and the end of DATA wait for something (the next hop, the content checks): each
runs as one task, and the input behind it is held (reading pauses once a fair
amount is held) until its reply is out. Nothing is logged per command.

The replies are aiosmtpd 1.4.6's texts (the worker used aiosmtpd before, and Postfix
logs and our tests know them), with what the worker adds: connection limits, a command
budget, command lines with CR or NUL refused, bare LF after commands refused on request,
a DATA reader with bounded memory and a bare CR/LF policy (`mailfilter.data`), a data
timeout with a minimum rate, a 421 on timeout, XFORWARD, RFC 3461 DSN parameters, and
Postfix's "SMTP protocol synchronization" check at DATA.

What is done with a transaction is the handler's (`mailfilter.server.FilterHandler`):
this module only calls its hooks and keeps its envelope.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
from email._header_value_parser import get_addr_spec, get_angle_addr  # as aiosmtpd
from email.errors import HeaderParseError
from typing import Any, Protocol

from mailfilter.config import FilterConfig
from mailfilter.data import (
    BARE_LINE_END,
    NO_ROOM,
    NOMINAL,
    TOO_BIG,
    TOO_LONG,
    TOO_MANY_HEADERS,
    DataAccumulator,
    DataLimits,
)
from mailfilter.relay import XFORWARD_ATTRIBUTES
from mailfilter.stats import Stats

log = logging.getLogger(__name__)

REFUSALS = {
    TOO_BIG: "552 5.3.4 Message size exceeds fixed maximum message size",
    TOO_LONG: "500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)",
    TOO_MANY_HEADERS: "552 5.6.0 Too many header fields",
    BARE_LINE_END: "550 5.6.0 Message contains bare CR or LF (see RFC 5321 2.3.8)",
    NO_ROOM: "452 4.3.1 Insufficient system storage, try again later",
}
NO_ROOM_AT_MAIL = "452 4.3.1 Insufficient system storage, try again later"
# The DATA budget of a worker process, in messages of the largest size allowed.
DATA_BUDGET_MESSAGES = 4
TEMPFAIL = "451 4.3.0 Temporary failure, please try again later"

# A command line longer than this (its LF included, less one) is refused whatever the
# command, and read no further than its end (aiosmtpd's stream limit).
_LINE_LIMIT = 1001
# RFC 5321 4.5.3.1.4; MAIL may be longer by what SIZE= and SMTPUTF8 add (RFC 1870 and
# RFC 6531, as aiosmtpd counts them) once EHLO has offered them.
_COMMAND_LIMIT = 512
_SIZE_PARAMETER = 26
_SMTPUTF8_PARAMETER = 10
# Unknown commands allowed in a session; the last one ends it.
_BOGUS_LIMIT = 5
# Input held while a command is answered before the socket is read no more.
_HOLD_LIMIT = 64 * 1024
# A timer that fires earlier than this before its deadline is armed again.
_TIMER_SLACK = 0.01

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

# HELP's texts: (syntax, what ESMTP adds).
_SYNTAX = {
    "AUTH": ("AUTH <mechanism>", ""),
    "DATA": ("DATA", ""),
    "EHLO": ("EHLO hostname", ""),
    "HELO": ("HELO hostname", ""),
    "HELP": ("HELP [command]", ""),
    "LHLO": ("LHLO hostname", ""),
    "MAIL": ("MAIL FROM: <address>", " [SP <mail-parameters>]"),
    "NOOP": ("NOOP [ignored]", ""),
    "QUIT": ("QUIT", ""),
    "RCPT": ("RCPT TO: <address>", " [SP <mail-parameters>]"),
    "RSET": ("RSET", ""),
    "STARTTLS": ("STARTTLS", ""),
    "VRFY": ("VRFY <address>", ""),
}


class Session:
    """What the client told about itself; starts over after STARTTLS."""

    __slots__ = ("peer", "host_name", "extended_smtp", "lmtp", "tls")

    def __init__(self, peer: Any, *, lmtp: bool, tls: bool = False) -> None:
        self.peer = peer
        self.host_name: str | None = None
        self.extended_smtp = False
        self.lmtp = lmtp
        self.tls = tls


class Envelope:
    """One transaction as the client sent it; the handler's subclass adds its own."""

    __slots__ = (
        "mail_from", "mail_options", "smtp_utf8", "rcpt_tos", "rcpt_options", "xforward",
        "eight_bit_declared", "dsn_mail", "dsn_rcpt",
    )

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.smtp_utf8 = False
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []
        # Postfix's XFORWARD attributes for this transaction, from a trusted peer.
        self.xforward: dict[str, str] | None = None
        self.eight_bit_declared = False
        # RFC 3461 parameters of MAIL, and of the RCPT being handled, passed on as sent.
        self.dsn_mail: list[str] = []
        self.dsn_rcpt: list[str] = []


class Handler(Protocol):
    """What the protocol asks of the handler."""

    def new_envelope(self) -> Envelope: ...

    def end_transaction(self, envelope: Envelope) -> None:
        """The envelope is done with (RSET, HELO, end of DATA, connection lost): end
        whatever it still holds."""

    def ehlo_keywords(self, session: Session) -> list[str]: ...

    def handle_MAIL(
        self, session: Session, envelope: Any, address: str, options: list[str]
    ) -> str:
        """Answered at once: MAIL waits for nothing (the next hop hears it with the
        first RCPT), and a task per message would cost more than the answer."""

    async def handle_RCPT(
        self, session: Session, envelope: Any, address: str, options: list[str]
    ) -> str: ...

    async def finish_data(
        self, session: Session, envelope: Any, content: bytes, *, lmtp: bool,
        verbatim: bool = False,
    ) -> str:
        """The reply to the end of DATA. `verbatim`: no line of `content` starts with a
        dot, so it can be relayed after DATA as it is."""

    def handle_exception(self, error: Exception) -> str: ...


def data_budget(config: FilterConfig) -> int:
    """The octets of message text the sessions of one worker process may hold at once:
    FILTER_MAX_DATA_BYTES, by default DATA_BUDGET_MESSAGES messages of
    FILTER_MAX_MESSAGE_SIZE."""
    return config.max_data_bytes or DATA_BUDGET_MESSAGES * config.max_message_size


class ConnectionGate:
    """Connections at the same time, in total and per client address; and the octets of
    message text all of them hold (`max_data_bytes`, 0: no limit).

    A message is held from its first octet of DATA until its end-of-data reply is out
    (read, checked, relayed or quarantined), and costs a few times its size meanwhile
    (its decoded parts, archive members, the copy on its way to the next hop). Without
    this budget, FILTER_MAX_CLIENTS sessions of FILTER_MAX_MESSAGE_SIZE messages would
    be gigabytes; with it, a message that does not fit is answered 452 (its sender tries
    again later) and its octets are read and dropped.
    """

    def __init__(self, *, max_clients: int, max_per_ip: int, max_data_bytes: int = 0) -> None:
        self.max_clients = max_clients
        self.max_per_ip = max_per_ip
        self.max_data_bytes = max_data_bytes
        self.total = 0
        self.by_ip: collections.Counter[str] = collections.Counter()
        self.data_bytes = 0

    def room(self) -> int | None:
        """Octets of message text that may still be held; None: no limit."""
        if not self.max_data_bytes:
            return None
        return max(0, self.max_data_bytes - self.data_bytes)

    def take(self, octets: int) -> bool:
        """Hold `octets` more of message text, if they fit."""
        if self.max_data_bytes and self.data_bytes + octets > self.max_data_bytes:
            return False
        self.data_bytes += octets
        return True

    def give_back(self, octets: int) -> None:
        self.data_bytes -= octets

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


class SMTPServerProtocol(asyncio.Protocol):
    """One SMTP (or, with `lmtp=True`, LMTP) session; see the module docstring."""

    def __init__(
        self,
        handler: Handler,
        *,
        config: FilterConfig,
        gate: ConnectionGate,
        stats: Stats,
        registry: set,
        loop: asyncio.AbstractEventLoop,
        tls_context: ssl.SSLContext | None = None,
        lmtp: bool = False,
    ) -> None:
        self.handler = handler
        self.config = config
        self.lmtp = lmtp
        self._gate = gate
        self._stats = stats
        self._registry = registry
        self._loop = loop
        self._tls_context = tls_context
        self._commands_table = _LMTP_COMMANDS if lmtp else _SMTP_COMMANDS
        self._limits = DataLimits(
            max_size=config.max_message_size,
            max_line_length=config.max_line_length,
            max_header_count=config.max_header_count,
            normalise_bare=config.bare_lf == "normalise",
        )
        self._reject_bare_lf = config.bare_lf == "reject"
        self.transport: Any = None
        self.session = Session(None, lmtp=lmtp)
        self.envelope: Any = handler.new_envelope()
        # The task answering the command being handled (MAIL, RCPT, end of DATA,
        # STARTTLS); input behind that command waits until it is done.
        self.task: asyncio.Task | None = None
        # Input not handled yet: self._buf[self._pos:].
        self._buf = b""
        self._pos = 0
        # Inside a command line too long to keep: its octets are dropped up to its LF.
        self._skipping = False
        # Replies not written yet.
        self._out: list[str] = []
        self._data: DataAccumulator | None = None
        self._data_started = 0.0
        # Octets of message text taken from the gate's DATA budget for this session.
        self._held = 0
        self._mail_limit = _COMMAND_LIMIT
        self._commands = 0
        self._bogus = _BOGUS_LIMIT
        self._reading_paused = False
        self._writing_paused = False
        self._closed = False
        self._refused = False
        self._gate_ip: str | None = None
        # One timer for the command and data timeouts: `_last` is moved on cheaply at
        # each command and chunk of data; the timer looks at it when it fires.
        self._timeout = config.command_timeout
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # Connection -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else ""
        reason = self._gate.admit(ip)
        if reason is not None:
            self._refused = self._closed = True
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
        self.session.peer = peer
        self._last = self._loop.time()
        self._arm_timer()
        transport.write(  # type: ignore[attr-defined]
            f"220 {self.config.hostname} {self.config.banner}\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if self._data is not None:
            self._feed(data)
            return
        if self._pos < len(self._buf):
            self._buf = self._buf[self._pos :] + data
        else:
            self._buf = data
        self._pos = 0
        if self.task is None and not self._writing_paused:
            self._process()
        elif not self._reading_paused and len(self._buf) > _HOLD_LIMIT:
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        # The client will send nothing more: whatever it waits for is not answered (as
        # aiosmtpd did, and a client that gave up on a message sends it again, so the
        # message being decided is not relayed); returning False closes the connection.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused or self.transport is None:
            return
        self._closed = True
        self.transport = None
        if self._gate_ip is not None:
            self._gate.release(self._gate_ip)
            self._gate_ip = None
            self._registry.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._data is not None:
            self._data = None
            self._give_back()
        # A next-hop transaction still open is ended (the client never heard its end).
        self._drop_transaction()
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        # The client does not read its replies: read no more commands either.
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.task is None and not self._closed and self._data is None:
            self._process()

    def _close(self) -> None:
        self._flush()
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    # Timeouts ---------------------------------------------------------------------------
    def _arm_timer(self) -> None:
        deadline = self._last + self._timeout
        if self._timer is not None:
            if deadline >= self._timer_at:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self._on_timer)
        self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed or self.task is not None:
            # The timeouts measure the client's silence (RFC 5321 4.5.3.2), not our own
            # work, which has timeouts of its own: `_resume` arms the timer again.
            return
        deadline = self._last + self._timeout
        if deadline - self._loop.time() > _TIMER_SLACK:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
            return
        self._stats.inc("protocol_errors", label="timeout")
        self._out.append(f"421 4.4.2 {self.config.hostname} Error: timeout exceeded")
        self._close()

    # Input ------------------------------------------------------------------------------
    def _process(self) -> None:
        """Handle the complete command lines held, until one must wait."""
        while self.task is None and self._data is None and not self._closed:
            buf = self._buf
            pos = self._pos
            end = buf.find(b"\n", pos)
            if end < 0:
                if len(buf) - pos > _LINE_LIMIT:
                    self._skipping = True
                    self._buf = b""
                    self._pos = 0
                break
            self._pos = end + 1
            if self._skipping:
                self._skipping = False
                self._line_too_long()
            else:
                self._line(buf, pos, end)
            if self._writing_paused:
                break
        self._flush()
        if self._reading_paused and self.task is None and not self._closed and (
            len(self._buf) - self._pos <= _HOLD_LIMIT
        ):
            self._reading_paused = False
            self.transport.resume_reading()

    def _too_many_commands(self) -> None:
        self._stats.inc("protocol_errors", label="too_many_commands")
        self._out.append("421 4.7.0 Error: too many commands, closing connection")
        self._close()

    def _line_too_long(self) -> None:
        self._commands += 1
        if self._commands > self.config.max_commands:
            self._too_many_commands()
        else:
            self._out.append("500 Command line too long")

    def _line(self, buf: bytes, start: int, end: int) -> None:
        """The command line buf[start:end], `end` being the position of its LF."""
        self._commands += 1
        if self._commands > self.config.max_commands:
            self._too_many_commands()
            return
        if end - start > _LINE_LIMIT:
            self._out.append("500 Command line too long")
            return
        crlf = end > start and buf[end - 1] == 13
        body = buf[start : end - 1] if crlf else buf[start:end]
        if b"\r" in body or b"\0" in body:
            # One line is one command: a CR inside must not act as a line end anywhere
            # downstream.
            self._stats.inc("protocol_errors", label="cr_in_command")
            self._out.append("501 5.5.2 Syntax error: CR or NUL in command line")
            return
        if not crlf and self._reject_bare_lf:
            self._stats.inc("protocol_errors", label="bare_lf")
            self._out.append("501 5.5.2 Syntax error: command not ended by CRLF")
            return
        if not body:
            self._out.append("500 Error: bad syntax")
            return
        command_bytes, _, arg_bytes = body.partition(b" ")
        try:
            command = command_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            self._out.append("500 Error: bad syntax")
            return
        # Non-UTF-8 octets are kept (surrogateescape) and sent back as they came.
        arg = arg_bytes.strip().decode("utf-8", "surrogateescape") if arg_bytes else None
        limit = (
            self._mail_limit if command == "MAIL" and self.session.extended_smtp
            else _COMMAND_LIMIT
        )
        if len(body) > limit:
            self._out.append("500 Command line too long")
            return
        method = self._commands_table.get(command)
        if method is None:
            self._bogus -= 1
            if self._bogus < 1:
                self._out.append("502 5.5.1 Too many unrecognized commands, goodbye.")
                self._close()
                return
            self._out.append(f'500 Error: command "{command}" not recognized')
            return
        self._last = self._loop.time()
        method(self, arg)

    def _flush(self) -> None:
        out = self._out
        if out and self.transport is not None:
            text = out[0] if len(out) == 1 else "\r\n".join(out)
            self.transport.write(text.encode("utf-8", "surrogateescape") + b"\r\n")
        out.clear()

    # Waiting for the handler ----------------------------------------------------------
    def _start(self, coroutine: Any) -> None:
        self.task = self._loop.create_task(coroutine)

    def _resume(self, reply: str | None) -> None:
        """The command that waited is answered: go on with the input held."""
        self.task = None
        if self._closed:
            return
        self._last = self._loop.time()
        self._arm_timer()
        if reply is not None:
            self._out.append(reply)
        if self._writing_paused:
            self._flush()
        else:
            self._process()

    async def _call(self, hook: Any, *args: Any) -> None:
        try:
            reply = await hook(self.session, self.envelope, *args)
        except Exception as error:
            reply = self.handler.handle_exception(error)
        self._resume(reply)

    def _new_envelope(self) -> None:
        # RSET, HELO/EHLO, STARTTLS and the end of DATA all start a new envelope: a
        # next-hop transaction still open on the old one is ended first.
        self._drop_transaction()
        self.envelope = self.handler.new_envelope()

    def _drop_transaction(self) -> None:
        self.handler.end_transaction(self.envelope)

    # Commands ---------------------------------------------------------------------------
    def _helo_needed(self, helo: str = "HELO") -> bool:
        if not self.session.host_name:
            self._out.append(f"503 Error: send {helo} first")
            return True
        return False

    def smtp_HELO(self, arg: str | None) -> None:
        if not arg:
            self._out.append("501 Syntax: HELO hostname")
            return
        self._new_envelope()
        self.session.extended_smtp = False
        self.session.host_name = arg
        self._out.append(f"250 {self.config.hostname}")

    def smtp_EHLO(self, arg: str | None) -> None:
        if not arg:
            # (LHLO too: aiosmtpd's text.)
            self._out.append("501 Syntax: EHLO hostname")
            return
        self._new_envelope()
        session = self.session
        session.extended_smtp = True
        session.host_name = arg
        config = self.config
        lines = [config.hostname]
        self._mail_limit = _COMMAND_LIMIT + _SMTPUTF8_PARAMETER
        if config.max_message_size:
            lines.append(f"SIZE {config.max_message_size}")
            self._mail_limit += _SIZE_PARAMETER
        lines += ("8BITMIME", "SMTPUTF8", "PIPELINING")
        if self._tls_context is not None and not session.tls:
            lines.append("STARTTLS")
        lines += self.handler.ehlo_keywords(session)
        lines.append("HELP")
        last = len(lines) - 1
        self._out.append(
            "\r\n".join(f"250{' ' if i == last else '-'}{line}" for i, line in enumerate(lines))
        )

    def lmtp_HELO(self, arg: str | None) -> None:
        self._out.append('500 Error: command "HELO" not recognized')

    def lmtp_EHLO(self, arg: str | None) -> None:
        self._out.append('500 Error: command "EHLO" not recognized')

    def smtp_NOOP(self, arg: str | None) -> None:
        self._out.append("250 OK")

    def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            self._out.append("501 Syntax: QUIT")
            return
        self._out.append("221 Bye")
        self._close()

    def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            self._out.append("501 Syntax: RSET")
            return
        self._new_envelope()
        self._out.append("250 2.0.0 Ok")

    def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:
            self._out.append("501 Syntax: VRFY <address>")
            return
        address, _ = _getaddr(arg)
        if address is None:
            self._out.append("502 Could not VRFY " + arg)
        else:
            self._out.append(
                "252 Cannot VRFY user, but will accept message and attempt delivery"
            )

    def smtp_EXPN(self, arg: str | None) -> None:
        self._out.append("502 EXPN not implemented")

    def smtp_HELP(self, arg: str | None) -> None:
        names = [
            name for name in sorted(self._commands_table)
            if name in _SYNTAX and (name != "STARTTLS" or self._tls_context is not None)
            and not (self.lmtp and name in ("HELO", "EHLO"))
        ]
        code = 250
        if arg:
            name = arg.upper()
            if name in names:
                text, extended = _SYNTAX[name]
                if self.session.extended_smtp:
                    text += extended
                self._out.append("250 Syntax: " + text)
                return
            code = 501
        self._out.append(f"{code} Supported commands: {' '.join(names)}")

    def smtp_AUTH(self, arg: str | None) -> None:
        # No mechanism is offered: aiosmtpd's answers up to the mechanism, then 504.
        if self._helo_needed("EHLO"):
            return
        if not self.session.extended_smtp:
            self._out.append("500 Error: command 'AUTH' not recognized")
        elif not self.session.tls:
            self._out.append(
                "538 5.7.11 Encryption required for requested authentication mechanism"
            )
        elif not arg:
            self._out.append("501 Not enough value")
        elif len(arg.split()) > 2:
            self._out.append("501 Too many values")
        else:
            self._out.append("504 5.5.4 Unrecognized authentication type")

    def smtp_STARTTLS(self, arg: str | None) -> None:
        self._stats.inc("tls_attempts")
        if arg:
            self._out.append("501 Syntax: STARTTLS")
            return
        if self._tls_context is None:
            self._out.append("454 TLS not available")
            return
        if self.session.tls:
            self._out.append("554 5.5.1 Error: TLS already active")
            return
        self._out.append("220 Ready to start TLS")
        self._flush()
        self._start(self._start_tls())

    async def _start_tls(self) -> None:
        assert self._tls_context is not None
        # Plaintext sent behind STARTTLS is never read as commands (RFC 3207 4.2; the
        # CVE-2011-0411 class). start_tls() stops reading plaintext before its first
        # wait; what arrives after that is the client's first words over TLS (which
        # can come before this coroutine goes on).
        self._buf = b""
        self._pos = 0
        self._reading_paused = False
        try:
            transport = await self._loop.start_tls(
                self.transport, self, self._tls_context, server_side=True,
                # The client's turn: as long as it may take for a command.
                ssl_handshake_timeout=self.config.command_timeout,
            )
        except Exception as error:
            # (The app protocol does not hear of a connection lost during the handshake.)
            log.warning("TLS handshake with %s failed: %r", self.session.peer, error)
            self._stats.inc("protocol_errors", label="internal_error")
            old = self.transport
            self.task = None
            self.connection_lost(error)
            if old is not None:
                old.close()
            return
        if self._closed or transport is None:
            return
        self.transport = transport
        # RFC 3207 4.2: the client starts again from EHLO.
        self._new_envelope()
        self.session = Session(self.session.peer, lmtp=self.lmtp, tls=True)
        self._last = self._loop.time()
        self._resume(None)

    def smtp_XFORWARD(self, arg: str | None) -> None:
        """Postfix's XFORWARD (for logging and the next hop only), from trusted peers."""
        if not self.config.xforward_allowed(peer_ip(self.session)):
            self._out.append("550 5.7.0 Error: insufficient authorization")
            return
        envelope = self.envelope
        if envelope.mail_from:
            self._out.append("503 5.5.1 Error: MAIL transaction in progress")
            return
        parsed = {}
        for pair in (arg or "").split():
            name, sep, value = pair.partition("=")
            name = name.upper()
            decoded = _xtext_decode(value)
            if (
                not sep
                or name not in XFORWARD_ATTRIBUTES
                or len(decoded) > 255
                or not all(33 <= ord(ch) <= 126 for ch in decoded)
            ):
                self._out.append("501 5.5.4 Syntax: XFORWARD attribute=value...")
                return
            parsed[name] = decoded
        if not parsed:
            self._out.append("501 5.5.4 Syntax: XFORWARD attribute=value...")
            return
        if envelope.xforward is None:
            envelope.xforward = dict.fromkeys(XFORWARD_ATTRIBUTES, "")
        for name, value in parsed.items():
            envelope.xforward[name] = "" if value.upper() == "[UNAVAILABLE]" else value
        self._out.append("250 2.0.0 Ok")

    def smtp_MAIL(self, arg: str | None) -> None:
        # RFC 3461 RET/ENVID are taken out, checked, and kept for the next hop.
        start = self._path_command(arg, _DSN_MAIL)
        if start is None:
            return
        arg, dsn = start
        syntax_error = self._syntax_error("MAIL FROM: <address>")
        found = self._address(arg, "FROM:", syntax_error)
        if found is None:
            return
        address, rest = found
        envelope = self.envelope
        if envelope.mail_from:
            self._out.append("503 Error: nested MAIL command")
            return
        parsed = self._parameters(rest, syntax_error)
        if parsed is None:
            return
        options, params = parsed
        body = params.pop("BODY", "7BIT")
        if body not in ("7BIT", "8BITMIME"):
            self._out.append("501 Error: BODY can only be one of 7BIT, 8BITMIME")
            return
        smtputf8 = params.pop("SMTPUTF8", False)
        if not isinstance(smtputf8, bool):
            self._out.append("501 Error: SMTPUTF8 takes no arguments")
            return
        envelope.smtp_utf8 = smtputf8
        size = params.pop("SIZE", None)
        if size:
            if isinstance(size, bool) or not (size.isascii() and size.isdigit()):
                self._out.append(syntax_error)
                return
            if self.config.max_message_size and int(size) > self.config.max_message_size:
                self._out.append(
                    "552 Error: message size exceeds fixed maximum message size"
                )
                return
            room = self._gate.room()
            if room is not None and int(size) > room:
                # RFC 1870 6.2: not now, maybe later.
                self._stats.inc("protocol_errors", label="no_room")
                self._out.append(NO_ROOM_AT_MAIL)
                return
        if params:
            self._out.append("555 MAIL FROM parameters not recognized or not implemented")
            return
        envelope.dsn_mail = dsn
        try:
            reply = self.handler.handle_MAIL(self.session, envelope, address, options)
        except Exception as error:
            reply = self.handler.handle_exception(error)
        self._out.append(reply)

    def smtp_RCPT(self, arg: str | None) -> None:
        start = self._path_command(arg, _DSN_RCPT)
        if start is None:
            return
        arg, dsn = start
        envelope = self.envelope
        if not envelope.mail_from:
            self._out.append("503 Error: need MAIL command")
            return
        syntax_error = self._syntax_error("RCPT TO: <address>")
        found = self._address(arg, "TO:", syntax_error)
        if found is None:
            return
        address, rest = found
        parsed = self._parameters(rest, syntax_error)
        if parsed is None:
            return
        options, params = parsed
        if params:
            self._out.append("555 RCPT TO parameters not recognized or not implemented")
            return
        envelope.dsn_rcpt = dsn
        self._start(self._call(self.handler.handle_RCPT, address, options))

    # The parts MAIL and RCPT share, in aiosmtpd's order of replies ----------------------
    def _path_command(
        self, arg: str | None, dsn_names: tuple[str, ...]
    ) -> tuple[str | None, list[str]] | None:
        """The argument without its DSN parameters, and those; None once answered (a
        bad DSN parameter, no HELO yet)."""
        dsn: list[str] = []
        if arg and self.session.extended_smtp:
            arg, dsn = self._take_dsn(arg, dsn_names)
            if arg is None:
                return None
        if self._helo_needed():
            return None
        return arg, dsn

    def _syntax_error(self, usage: str) -> str:
        if self.session.extended_smtp:
            return f"501 Syntax: {usage} [SP <mail-parameters>]"
        return f"501 Syntax: {usage}"

    def _address(
        self, arg: str | None, keyword: str, syntax_error: str
    ) -> tuple[str, str | None] | None:
        """The address after `keyword` and what follows it; None once answered."""
        path = _strip_keyword(keyword, arg)
        if path is None:
            self._out.append(syntax_error)
            return None
        address, rest = _getaddr(path)
        if address is None:
            self._out.append("553 5.1.3 Error: malformed address")
            return None
        if not address or (rest and not self.session.extended_smtp):
            self._out.append(syntax_error)
            return None
        return address, rest

    def _parameters(
        self, rest: str | None, syntax_error: str
    ) -> tuple[list[str], dict[str, Any]] | None:
        """The parameters as sent (upper-cased) and parsed; None once answered."""
        options = rest.upper().split() if rest else []
        params = _getparams(options)
        if params is None:
            self._out.append(syntax_error)
            return None
        return options, params

    def _take_dsn(self, arg: str, names: tuple[str, ...]) -> tuple[str | None, list[str]]:
        """The argument without the RFC 3461 parameters `names`, and those parameters;
        (None, []) with a 501 queued when one of them is wrong."""
        end = arg.rfind(">")
        if end == len(arg) - 1:
            return arg, []
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
                self._out.append(f"501 5.5.4 Syntax error in {name} parameter")
                return None, []
            seen.add(name)
            dsn.append(f"{name}={value.upper() if name in ('RET', 'NOTIFY') else value}")
        return " ".join([head, *kept]), dsn

    def smtp_DATA(self, arg: str | None) -> None:
        if self._helo_needed():
            return
        if arg:
            self._out.append("501 5.5.4 Syntax: DATA")
            return
        if self._pos < len(self._buf):
            # Message text sent before our 354 (or before the replies to MAIL/RCPT): if
            # DATA failed those lines would be read as commands. Postfix calls this
            # "SMTP protocol synchronization"; the session ends here.
            self._stats.inc("protocol_errors", label="pipelining")
            self._out.append("554 5.5.0 Error: SMTP protocol synchronization")
            self._close()
            return
        if not self.envelope.rcpt_tos:
            self._out.append("503 5.5.1 Error: need RCPT command")
            return
        self._out.append("354 End data with <CR><LF>.<CR><LF>")
        self._data = DataAccumulator(self._limits)
        self._buf = b""
        self._pos = 0
        self._timeout = self.config.data_timeout
        self._data_started = self._last = self._loop.time()
        self._arm_timer()

    def _feed(self, chunk: bytes) -> None:
        accumulator = self._data
        assert accumulator is not None
        now = self._last = self._loop.time()
        end = accumulator.feed(chunk)
        if accumulator.state == NOMINAL:
            more = accumulator.held - self._held
            if more > 0:
                if self._gate.take(more):
                    self._held += more
                else:
                    # Read on to the end of data, keeping nothing, then answer 452.
                    accumulator.give_up(NO_ROOM)
                    self._give_back()
        elif self._held:
            self._give_back()
        config = self.config
        if end < 0:
            if config.min_data_rate and now - self._data_started > (
                config.data_timeout + accumulator.size / config.min_data_rate
            ):
                self._stats.inc("protocol_errors", label="slow_data")
                self._out.append("421 4.4.2 Error: data too slow, closing connection")
                self._close()
            return
        self._data = None
        # The client's next command is due within the command timeout, however long the
        # data timeout it had for the message.
        self._timeout = config.command_timeout
        self._arm_timer()
        # Sent after the end of data without waiting for its reply: commands, read as
        # such once the reply is out.
        self._buf = chunk[end:] if end < len(chunk) else b""
        self._pos = 0
        stats = self._stats
        stats.inc("bytes_received", accumulator.size)
        if accumulator.bare_seen:
            stats.inc("protocol_errors", label="bare_cr_lf")
        if accumulator.eight_bit and not self.envelope.eight_bit_declared:
            stats.inc("protocol_errors", label="8bit_undeclared")
        if accumulator.state != NOMINAL:
            if accumulator.state == NO_ROOM:
                stats.inc("messages_tempfailed", label=NO_ROOM)
            else:
                stats.inc("messages_rejected", label=accumulator.state)
                stats.inc("bytes_rejected", accumulator.size)
            replies = self._per_recipient(REFUSALS[accumulator.state])
            self._new_envelope()
            self._out.extend(replies)
            self._process()
            return
        self._start(self._finish_data(accumulator.content(), accumulator.verbatim))

    async def _finish_data(self, content: bytes, verbatim: bool) -> None:
        try:
            # Answered only once the message is safe (the handler's rule).
            reply = await self.handler.finish_data(
                self.session, self.envelope, content, lmtp=self.lmtp, verbatim=verbatim
            )
        except Exception as error:
            reply = "\r\n".join(self._per_recipient(self.handler.handle_exception(error)))
        finally:
            del content
            self._give_back()
        self._commands = 0
        self._new_envelope()
        self._resume(reply)

    def _give_back(self) -> None:
        """The message text this session held is no longer held."""
        if self._held:
            self._gate.give_back(self._held)
            self._held = 0

    def _per_recipient(self, reply: str) -> list[str]:
        """The replies to the end of data that `reply` stands for: one per accepted
        recipient in LMTP (RFC 2033 4.2), else itself."""
        if self.lmtp:
            return [reply] * max(1, len(self.envelope.rcpt_tos))
        return [reply]


_SMTP_COMMANDS = {
    name[5:]: method for name, method in vars(SMTPServerProtocol).items()
    if name.startswith("smtp_")
}
_LMTP_COMMANDS = {
    **_SMTP_COMMANDS,
    "LHLO": SMTPServerProtocol.smtp_EHLO,
    "HELO": SMTPServerProtocol.lmtp_HELO,
    "EHLO": SMTPServerProtocol.lmtp_EHLO,
}


def peer_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""


def _strip_keyword(keyword: str, arg: str | None) -> str | None:
    if arg is None:
        return None
    length = len(keyword)
    if arg[:length].upper() == keyword:
        return arg[length:].strip()
    return None


def _getaddr(arg: str) -> tuple[str | None, str | None]:
    """A path and what follows it: aiosmtpd's parse (the email package's RFC 5322
    parser, tens of microseconds a call), with a shortcut for the usual
    `<dot-atom@host.name>` that gives the same address and rest. None for the address
    when it cannot be parsed."""
    if not arg:
        return "", ""
    match = _SIMPLE_PATH.match(arg)
    if match is not None:
        rest = arg[match.end() :].lstrip(" \t")
        if not rest.startswith("("):
            return match.group(1), rest
    try:
        if arg.lstrip().startswith("<"):
            address, rest = get_angle_addr(arg)
        else:
            address, rest = get_addr_spec(arg)
    except HeaderParseError:
        return None, None
    return address.addr_spec, rest


def _getparams(params: list[str]) -> dict[str, str | bool] | None:
    """ESMTP parameters by name; None when one is not `keyword[=value]` or is given twice
    (RFC 1869)."""
    result: dict[str, str | bool] = {}
    for param in params:
        name, eq, value = param.partition("=")
        if not name.isalnum() or (eq and not value) or name in result:
            return None
        result[name] = value if eq else True
    return result


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
