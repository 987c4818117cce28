"""The worker's SMTP side: the handler that acts on each transaction, and the server.

`FilterHandler` is a plain handler: `handle_MAIL`/`handle_RCPT` hooks that return SMTP
replies, and `finish_data`, called once a message was read. The protocol that calls them
(limits, timeouts, the DATA reader, XFORWARD, STARTTLS) is `mailfilter.smtp`.
`FilterServer` owns sockets and lifecycle.

Never lose mail: the end of DATA is answered only after the next hop answered (pass) or
the quarantine sink returned (discard, bounce); any failure on the way is a 451.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from email.utils import formatdate
from typing import Any

from mailfilter.config import ConfigError, FilterConfig, client_address
from mailfilter.front import RelayRecipients
from mailfilter.interfaces import DEFAULT_PROFILE, Profile, QuarantineSink, RecipientLookup
from mailfilter.policy import Envelope as PolicyEnvelope
from mailfilter.policy import Policy, ProfilePolicy, TemporaryFailure, Verdict
from mailfilter.relay import XFORWARD_ATTRIBUTES, Relay, Reply, Transaction
from mailfilter.smtp import REFUSALS as REFUSALS
from mailfilter.smtp import (
    TEMPFAIL,
    ConnectionGate,
    Envelope,
    Session,
    SMTPServerProtocol,
    data_budget,
    peer_ip,
)
from mailfilter.stats import Stats, serve_metrics

log = logging.getLogger(__name__)

_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9._:\[\]-]")


class FilterEnvelope(Envelope):
    """The envelope plus what the worker keeps for one transaction."""

    __slots__ = ("relay", "profile", "prepared")

    def __init__(self) -> None:
        super().__init__()
        self.relay: Transaction | None = None
        self.profile: Profile | None = None
        # What the policy started at the first accepted RCPT (its DNS queries), handed to
        # its decide() after DATA and cancelled when the transaction ends without one.
        self.prepared: Any = None


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
        # Next-hop transactions being ended (aborts of transactions left open).
        self.background: set[asyncio.Task] = set()

    def new_envelope(self) -> FilterEnvelope:
        return FilterEnvelope()

    def end_transaction(self, envelope: FilterEnvelope) -> None:
        """The envelope is done with: what the policy prepared is cancelled, and a
        next-hop transaction still open is aborted."""
        prepared = envelope.prepared
        if prepared is not None:
            envelope.prepared = None
            prepared.cancel()
        relay = envelope.relay
        if relay is None:
            return
        envelope.relay = None
        task = asyncio.get_running_loop().create_task(relay.abort())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def ehlo_keywords(self, session: Session) -> list[str]:
        """What EHLO offers besides the protocol's own extensions."""
        keywords = ["ENHANCEDSTATUSCODES", "DSN"]
        if self.config.xforward_allowed(peer_ip(session)):
            keywords.insert(0, "XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
        return keywords

    def handle_MAIL(
        self,
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
        reply, transaction = self.relay.begin(
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

    def handle_exception(self, error: Exception) -> str:
        # A failure of ours (a lookup that cannot be reached, say) must make the client
        # try again, not bounce.
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
        session: Session,
        envelope: FilterEnvelope,
        content: bytes,
        *,
        lmtp: bool,
        verbatim: bool = False,
    ) -> str:
        """The reply to the end of DATA, given only once the message is safe.
        `verbatim`: no line of `content` starts with a dot (see mailfilter.smtp)."""
        transaction = envelope.relay
        envelope.relay = None
        prepared, envelope.prepared = envelope.prepared, None
        recipients = list(envelope.rcpt_tos)
        self.stats.inc("messages_received")
        reply: Reply | list[Reply]
        try:
            reply = await self._act(
                session, envelope, transaction, content, prepared, verbatim=verbatim
            )
        except Exception:
            log.exception("unexpected failure after DATA; answering 451")
            self.stats.inc("messages_tempfailed", label="error")
            reply = Reply(451, "4.3.0 Temporary failure, please try again later")
        except BaseException:
            # Cancelled: the client is gone and hears nothing, so the next hop must not
            # keep the message either (a transaction already ended is left as it is).
            if transaction is not None and not transaction.ended:
                transaction.drop()
            raise
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
        *,
        verbatim: bool = False,
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
            # Our header fields start no line with a dot; a message the checks rewrote
            # goes through the relay's full line-end and dot pass.
            verbatim = verbatim and verdict.message is None
            message = self._top_headers(session, envelope, verdict) + relayed
            if self.config.next_hop_lmtp:
                return self._count_lmtp(
                    await transaction.data_per_recipient(message, verbatim=verbatim), size
                )
            reply = await transaction.data(message, verbatim=verbatim)
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
            # The store is this message's next hop: it gets as long as the next hop would
            # (a stalled disk or database gives 451, not a session held for ever; the sink
            # then gives the write up, so that the retried copy is the only one).
            mail_id = await asyncio.wait_for(
                self.sink.write(
                    category=verdict.category or "BADH",
                    message=self._received(session, envelope) + content,
                    sender=_reverse_path(envelope.mail_from or ""),
                    recipients=list(envelope.rcpt_tos),
                    reasons=list(verdict.reasons),
                    headers=list(verdict.quarantine_headers),
                ),
                self.config.relay_data_timeout,
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
        """What the checks know of the transaction. Behind Postfix the client is the one
        Postfix named in XFORWARD (a trusted peer's word), not Postfix itself: the DNS
        checks must look up the sending MTA, not 127.0.0.1. When Postfix names no address
        (`ADDR=[UNAVAILABLE]`: mail submitted locally) the client is unknown: Postfix is
        still not it."""
        peer = session.peer or ("", 0)
        address, name, helo = str(peer[0]), "", session.host_name or ""
        forwarded = envelope.xforward
        if forwarded is not None:
            address = client_address(forwarded.get("ADDR") or "")
            name = forwarded.get("NAME") or ""
            if name.upper() == "[UNAVAILABLE]":
                name = ""
            helo = forwarded.get("HELO") or ""
        return PolicyEnvelope(
            sender=_reverse_path(envelope.mail_from or ""),
            recipients=tuple(envelope.rcpt_tos),
            client_address=address,
            client_name=name,
            helo=helo,
            smtputf8=envelope.smtp_utf8,
            relay_client=self._relay_client(session, envelope),
        )

    def _relay_client(self, session: Session, envelope: FilterEnvelope) -> bool:
        """The client is one of FILTER_RELAY_IPS: our own, sending out. In front mode the
        peer itself; behind Postfix the client Postfix named in XFORWARD."""
        if self.config.mode == "front":
            return self.config.relay_allowed(peer_ip(session))
        forwarded = (envelope.xforward or {}).get("ADDR", "")
        return bool(forwarded) and self.config.relay_allowed(forwarded)

    def _relay_profile(self) -> Profile:
        choose = getattr(self.lookup, "relay_profile", None)
        chosen = choose() if callable(choose) else None
        return chosen or self.relay_profile

    def _top_headers(self, session: Session, envelope: FilterEnvelope, verdict: Verdict) -> bytes:
        """The only change made to a passed message: header fields put on top."""
        block = self._received(session, envelope)
        for name, value in verdict.headers:
            clean = " ".join(value.replace("\0", " ").split())
            block += f"{name}: {clean}\r\n".encode("utf-8", "replace")
        return block

    def _received(self, session: Session, envelope: FilterEnvelope) -> bytes:
        """Our Received field: on top of a passed message, and between the quarantine
        file's own fields and the message it keeps (as amavisd-new writes it there)."""
        peer = session.peer or ("", 0)
        helo = _HELO_UNSAFE.sub("?", session.host_name or "unknown")[:255]
        client = f"[{peer[0]}]"
        if envelope.xforward:
            # A trusted peer (Postfix) told us who its client was: name that client.
            forwarded = envelope.xforward
            helo = _HELO_UNSAFE.sub("?", forwarded.get("HELO") or "unknown")[:255]
            name = _HELO_UNSAFE.sub("?", forwarded.get("NAME") or "unknown")[:255]
            client = f"{name} [{_HELO_UNSAFE.sub('?', forwarded.get('ADDR') or '')}]"
        if session.lmtp:
            proto = "LMTP"
        else:
            proto = "ESMTP" if session.extended_smtp else "SMTP"
        if envelope.smtp_utf8:
            proto = "UTF8" + ("SMTP" if proto != "LMTP" else "LMTP")
        local_id = _local_id()
        received = (
            f"Received: from {helo} ({client})\r\n"
            f"\tby {self.config.hostname} (spamviewer) with {proto} id {local_id}"
        )
        if len(envelope.rcpt_tos) == 1 and len(envelope.rcpt_tos[0]) < 200:
            received += f"\r\n\tfor <{envelope.rcpt_tos[0]}>"
        received += f";\r\n\t{_date_now()}\r\n"
        return received.encode("utf-8", "replace")


# Random queue ids for the Received field, drawn in batches (one getrandom() call for
# many messages); a forked worker draws its own.
_ID_BATCH = 256
_ids: list[str] = []
os.register_at_fork(after_in_child=_ids.clear)


def _local_id() -> str:
    if not _ids:
        pool = secrets.token_bytes(6 * _ID_BATCH)
        _ids.extend(pool[i : i + 6].hex() for i in range(0, len(pool), 6))
    return _ids.pop()


_date_cache: tuple[int, str] = (0, "")


def _date_now() -> str:
    """The RFC 5322 date of now, made once a second."""
    global _date_cache
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache = (second, formatdate(second, localtime=False))
    return _date_cache[1]


def _reverse_path(address: str) -> str:
    """The null reverse-path (bounces) comes as "<>" from the path parser (as aiosmtpd's did);
    the empty string here."""
    return "" if address == "<>" else address


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
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`sock`: an already bound listening socket (runfilter binds before it drops
        privileges, and gives each of FILTER_PROCESSES its own SO_REUSEPORT socket).
        `tls`: the STARTTLS context, loaded already (runfilter loads the key once, as root,
        also for a worker process it starts later as FILTER_USER); else from `config`."""
        if config.mode == "front" and lookup is None and not (
            config.relay_map_path or config.relay_domains
        ):
            raise ConfigError(
                "FILTER_MODE=front needs FILTER_RELAY_MAP or FILTER_RELAY_DOMAINS: "
                "without them no recipient would be refused (an open relay)"
            )
        self.sock = sock
        self.tls = tls
        self.config = config
        self.sink = sink
        self.policy = policy
        self.lookup = lookup
        self.stats = stats or Stats()
        self.gate = ConnectionGate(
            max_clients=config.max_clients,
            max_per_ip=config.max_per_ip,
            max_data_bytes=data_budget(config),
        )
        self._server: asyncio.Server | None = None
        self._metrics: asyncio.Server | None = None
        self._sessions: set[SMTPServerProtocol] = set()
        self.relay: Relay | None = None
        self.handler: FilterHandler | None = None

    async def start(self) -> None:
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
        tls = self.tls if self.tls is not None else tls_context(self.config)

        def factory() -> asyncio.Protocol:
            return SMTPServerProtocol(
                self.handler,
                config=self.config,
                gate=self.gate,
                stats=self.stats,
                registry=self._sessions,
                loop=loop,
                tls_context=tls,
                lmtp=self.config.lmtp,
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
        tasks = [session.task for session in sessions if session.task is not None]
        if self.handler is not None:
            tasks.extend(self.handler.background)
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
