"""The shared test world: vadmin, two users (alice, bob) with their addresses, and a factory
that puts a message into a real quarantine store on disk with its index rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime

import pytest
from django.contrib.auth.models import User

from directory.models import Address
from quarantine.indexer import index_file
from quarantine.models import Message, Recipient
from quarantine.store import FileStore, generate_mail_id

PASSWORD = "correct horse battery staple"


@dataclass
class World:
    vadmin: User
    alice: User
    bob: User


@pytest.fixture(autouse=True)
def fast_password_hasher(settings):
    """PBKDF2's deliberate slowness would dominate the suite; production keeps it."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def quarantine_dir(settings, tmp_path):
    """Every test gets its own empty store."""
    root = tmp_path / "quarantine"
    root.mkdir()
    settings.QUARANTINE_DIR = root
    return root


@pytest.fixture(autouse=True)
def static_files(settings, tmp_path_factory):
    """Pages render without a collectstatic run: plain storage (the manifest one needs its
    manifest) and an existing STATIC_ROOT (whitenoise warns about a missing one)."""
    root = tmp_path_factory.getbasetemp() / "staticfiles"
    root.mkdir(exist_ok=True)
    settings.STATIC_ROOT = root
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def world(db) -> World:
    vadmin = User.objects.create_superuser("vadmin", "", PASSWORD)
    alice = User.objects.create_user("alice", "alice@example.test", PASSWORD)
    bob = User.objects.create_user("bob", "bob@example.test", PASSWORD)
    for user, addresses in (
        (alice, ["alice@example.test", "alice.alias@example.test"]),
        (bob, ["bob@example.test"]),
    ):
        for address in addresses:
            Address.objects.create(address=address, user=user)
    return World(vadmin=vadmin, alice=alice, bob=bob)


def build_mail(
    *,
    subject: str = "Hello",
    from_: str = "Sender <sender@remote.example>",
    to: str = "alice@example.test",
    body: str = "Hello there.\n",
    html: str | None = None,
    date: datetime | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = from_
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date or datetime(2026, 11, 20, 10, 0, tzinfo=UTC))
    msg["Message-ID"] = f"<{generate_mail_id()[0]}@remote.example>"
    if html is not None and body is None:
        msg.set_content(html, subtype="html")
    else:
        msg.set_content(body)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    return msg.as_bytes()


@pytest.fixture
def make_message(settings):
    """Write a quarantine file into the test store and index it with the real indexer."""

    counter = {"n": 0}

    def make(
        *,
        category: str = "SPAM",
        recipients: list[str] | None = None,
        sender: str = "sender@remote.example",
        raw: bytes | None = None,
        subject: str = "Hello",
        from_: str = "Sender <sender@remote.example>",
        received_at: datetime | None = None,
        spam_score: float | None = None,
        reasons: str = "",
        **mail_kwargs,
    ) -> Message:
        recipients = recipients or ["alice@example.test"]
        counter["n"] += 1
        raw = raw or build_mail(subject=subject, from_=from_, to=", ".join(recipients),
                                **mail_kwargs)
        mail_id, _ = generate_mail_id()
        store = FileStore(settings.QUARANTINE_DIR, subdir_levels=1)
        key = store.write(category=category, mail_id=mail_id, message=raw, sender=sender,
                          recipients=recipients)
        message = index_file(store, key)
        # Overrides the tests need: a fixed order, a score, reasons. They go to the same
        # columns the indexer fills, on the message and on its recipient rows.
        when = received_at or datetime.now(UTC) - timedelta(seconds=1000 - counter["n"])
        overrides: dict[str, object] = {"received_at": when}
        if spam_score is not None:
            overrides["spam_score"] = spam_score
        if reasons:
            overrides["reasons"] = reasons
        Message.objects.filter(pk=message.pk).update(**overrides)
        Recipient.objects.filter(message=message).update(received_at=when)
        message.refresh_from_db()
        return message

    return make


@dataclass
class SmtpSink:
    """A real SMTP server (aiosmtpd) on a loopback port chosen by the kernel.

    `received` holds (envelope sender, recipients, data as received on the wire after
    dot-unstuffing); `reply` is its answer at end of data; `delay` holds the answer back."""

    host: str = "127.0.0.1"
    port: int = 0
    reply: str = "250 2.0.0 Ok: queued"
    delay: float = 0.0
    received: list[tuple[str, list[str], bytes]] | None = None

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd hook
        import asyncio

        if self.delay:
            await asyncio.sleep(self.delay)
        if self.reply.startswith("250"):
            self.received.append(
                (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
            )
        return self.reply


@pytest.fixture
def smtp_sink(settings):
    """Start an SmtpSink in its own event loop thread and point the release settings at it."""
    import asyncio
    import threading

    from aiosmtpd.smtp import SMTP

    sink = SmtpSink(received=[])
    loop = asyncio.new_event_loop()

    def factory() -> SMTP:
        return SMTP(sink, hostname="sink.test", loop=loop)

    server = loop.run_until_complete(loop.create_server(factory, "127.0.0.1", 0))
    sink.port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    settings.RELEASE_SMTP_HOST = sink.host
    settings.RELEASE_SMTP_PORT = sink.port
    settings.RELEASE_SMTP_TIMEOUT = 10
    yield sink

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
