"""Edge cases of the quarantine path: file format under crafted input, durability of the
store's writes, and what the filter worker answers when part of the write fails.

Everything runs on real files, real PostgreSQL and, where the path needs it, a real SMTP
server on loopback (the release sink, or the worker with its next hop).
"""

from __future__ import annotations

import asyncio
import errno
import os
import smtplib
import stat

import pytest

from quarantine.indexer import index_directory
from quarantine.models import Message, Recipient
from quarantine.release import release_message
from quarantine.sink import DjangoQuarantineSink
from quarantine.store import FileStore, generate_mail_id, to_crlf
from tests.mailfilter import conftest as mailfilter_conftest
from tests.mailfilter.conftest import QuarantineEverything

# The worker fixtures of tests/mailfilter: a real filter worker and its next hop.
next_hop = mailfilter_conftest.next_hop
start_filter = mailfilter_conftest.start_filter

BODY = b"From: Sender <sender@remote.example>\nTo: alice@example.test\nSubject: held\n\nbody\n"


def wire(raw: bytes) -> bytes:
    data = to_crlf(raw)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


# The message's own header section may start with any field, including the names that
# amavisd-new puts in front of a quarantined message.
LEADING_FIELDS = [
    pytest.param(b"X-Envelope-To-Blocked: <bob@example.test>\n", id="x-envelope-to-blocked"),
    pytest.param(b"X-Envelope-To-Blocked: , <bob@example.test>\n", id="blocked-after-comma"),
    pytest.param(b"X-Envelope-To: <bob@example.test>\n", id="x-envelope-to"),
    pytest.param(
        b"X-Spam-Flag: NO\nX-Envelope-To-Blocked: <bob@example.test>\n", id="x-spam-first"
    ),
]


@pytest.mark.parametrize("leading", LEADING_FIELDS)
def test_message_starting_with_envelope_field_names_adds_no_recipient(world, make_message, leading):
    """The envelope block of a quarantine file is ended by a field that amavisd-new did not
    prepend (its own Received line, spec 1.5 item 8). A message whose header section starts
    with X-Envelope-To / X-Envelope-To-Blocked fields is stored and indexed for its real
    envelope recipients only, and its own header lines stay part of the message."""
    raw = leading + BODY
    message = make_message(raw=raw, recipients=["alice@example.test"])

    assert list(message.recipients.values_list("address", flat=True)) == ["alice@example.test"]
    assert not Message.objects.visible_to(world.bob).exists()
    stored = FileStore(message.origin).load(message.storage_key)
    assert stored.blocked_recipients == ["alice@example.test"]
    # The message kept: the Received field that ends the block, then every line it came
    # with.
    assert stored.message.startswith(b"Received: ")
    assert stored.message.endswith(b"\n" + raw)


@pytest.mark.parametrize(
    "start",
    [
        pytest.param(b" x\n", id="continuation-line"),
        pytest.param(b"X-Spam-" + b"a" * 90 + b": 1\n", id="long-field-name"),
    ],
)
def test_message_whose_first_line_would_extend_the_block_adds_no_recipient(tmp_path, start):
    """Whatever the writer, the store ends the block before a message whose first line
    would be read as part of it: a continuation line (folded into the block's last
    field) or an envelope-like field name of any length."""
    store = FileStore(tmp_path / "store")
    mail_id, _ = generate_mail_id()
    key = store.write(
        category="BANNED", mail_id=mail_id,
        message=start + b"X-Envelope-To: <bob@example.test>\n\nbody\n",
        sender="sender@remote.example", recipients=["alice@example.test"],
    )
    stored = store.load(key)
    assert stored.recipients == ["alice@example.test"]
    assert stored.message.endswith(start + b"X-Envelope-To: <bob@example.test>\n\nbody\n")


def test_addresses_with_and_without_brackets_in_one_field_are_all_read():
    """A recipient list may mix `a@x` and `<b@y>`: every address is read, and a comma
    inside angle brackets stays part of its address."""
    from quarantine.store import split_addresses

    assert split_addresses('a@example.test, <"x,y"@example.test>,\n <b@example.test>') == [
        "a@example.test", '"x,y"@example.test', "b@example.test"]


def test_release_sends_the_message_own_leading_fields_to_its_real_recipients(
    world, make_message, smtp_sink
):
    """Release sends the original message once, to its envelope recipients, with every
    header line it arrived with, even when its first fields have names that amavisd-new
    uses in its prepended block (X-Spam-*, X-Envelope-To-Blocked)."""
    raw = b"X-Spam-Flag: NO\nX-Envelope-To-Blocked: , <bob@example.test>\n" + BODY
    message = make_message(
        raw=raw, recipients=["alice@example.test"], sender="sender@remote.example"
    )

    result = release_message(message, user=world.vadmin)

    assert result.ok, result.text
    [(sender, recipients, data)] = smtp_sink.received
    assert (sender, recipients) == ("sender@remote.example", ["alice@example.test"])
    # The Received field that ended the quarantine block (as amavisd-new releases it),
    # then the message as it came.
    assert data.startswith(b"Received: ") and data.endswith(b"\r\n" + wire(raw))


def test_quarantine_file_has_a_received_field_after_the_envelope_block(
    transactional_db, quarantine_dir
):
    """amavisd-new writes a Received field between its prepended fields and the original
    message (spec 1.5 item 8); the sink's files have one too, so that the envelope block
    ends where the original message begins."""
    store = FileStore(quarantine_dir)
    sink = DjangoQuarantineSink(store)
    mail_id = asyncio.run(
        sink.write(
            category="VIRUS",
            message=BODY,
            sender="sender@remote.example",
            recipients=["alice@example.test"],
            reasons=["Eicar-Test-Signature"],
        )
    )
    key = Message.objects.get(mail_id=mail_id).storage_key
    lines = store.read(key).split(b"\n")
    first_original = lines.index(b"From: Sender <sender@remote.example>")
    assert any(line.startswith(b"Received: ") for line in lines[:first_original])


def test_recipient_with_a_comma_in_its_quoted_local_part_is_indexed_whole(world, make_message):
    """An envelope recipient is one address however its local part is spelled: a quoted
    local part with a comma (valid in RCPT TO, RFC 5321 4.1.2) is read back from the file
    and indexed as the same single address, never split into two made-up ones."""
    quoted = '"smith,john"@example.test'
    message = make_message(raw=BODY, recipients=[quoted, "alice@example.test"])

    stored = FileStore(message.origin).load(message.storage_key)
    assert stored.recipients == [quoted, "alice@example.test"]
    assert sorted(
        Recipient.objects.filter(message=message).values_list("address", flat=True)
    ) == sorted([quoted, "alice@example.test"])


def test_new_sub_directory_is_made_durable_in_its_parent(tmp_path, monkeypatch):
    """A write that creates the sub-directory (`b/` for mail_id b...) fsyncs the store's
    root after creating it: otherwise a crash can lose the sub-directory, and with it a
    file that was acknowledged."""
    root = tmp_path / "store"
    root.mkdir()
    store = FileStore(root, subdir_levels=1)
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    mail_id, _ = generate_mail_id()
    key = store.write(
        category="VIRUS",
        mail_id=mail_id,
        message=BODY,
        sender="sender@remote.example",
        recipients=["alice@example.test"],
    )

    assert store.path(key).exists()
    assert str(root / mail_id[0]) in synced
    assert str(root) in synced


def test_written_file_is_group_readable_whatever_the_process_umask(tmp_path):
    """Quarantine files are 0640 and sub-directories 0750 (spec 1.3), so that the viewer
    and amavisd-new's tools in the store's group can read them, whatever umask the worker
    was started with (amavisd-new sets its own umask 027)."""
    store = FileStore(tmp_path / "store", subdir_levels=1)
    mail_id, _ = generate_mail_id()
    old = os.umask(0o077)
    try:
        key = store.write(
            category="BANNED",
            mail_id=mail_id,
            message=BODY,
            sender="sender@remote.example",
            recipients=["alice@example.test"],
        )
    finally:
        os.umask(old)
    path = store.path(key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750


def _send(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.test")
        client.mail("a@remote.example")
        client.rcpt("alice@example.test")
        return client.data(BODY)


def test_store_failure_after_the_rename_leaves_no_file_the_indexer_shows(
    transactional_db, start_filter, quarantine_dir, monkeypatch
):
    """When the store fails after the file got its final name (the directory fsync reports
    an I/O error), the client hears 4xx and keeps the message; the store then holds no
    file that an indexer run shows as a held message (the client's retry would otherwise
    make it a duplicate)."""

    def failing_fsync_directory(path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr("quarantine.store.fsync_directory", failing_fsync_directory)
    store = FileStore(quarantine_dir)
    worker = start_filter(
        sink=DjangoQuarantineSink(store),
        policy=QuarantineEverything(destiny="discard", category="VIRUS"),
    )

    code, _ = _send(worker.port)

    assert code // 100 == 4
    assert Message.objects.count() == 0
    summary = index_directory(quarantine_dir)
    assert summary.new == 0
    assert Message.objects.count() == 0


def test_database_error_while_indexing_gives_451_and_removes_the_file(
    transactional_db, start_filter, quarantine_dir
):
    """A database error while indexing the new file (here a real PostgreSQL error raised by
    a trigger) makes the worker answer 451 and leaves neither a row nor a file."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the trigger is PL/pgSQL: run with DATABASE_URL pointing at PostgreSQL")
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION edge_refuse() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'refused by test'; END $$ LANGUAGE plpgsql"
        )
        cursor.execute(
            f"CREATE TRIGGER edge_refuse BEFORE INSERT ON {Recipient._meta.db_table} "
            "FOR EACH ROW EXECUTE FUNCTION edge_refuse()"
        )
    try:
        worker = start_filter(
            sink=DjangoQuarantineSink(FileStore(quarantine_dir)),
            policy=QuarantineEverything(destiny="discard", category="BANNED"),
        )
        code, _ = _send(worker.port)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER edge_refuse ON {Recipient._meta.db_table}")
            cursor.execute("DROP FUNCTION edge_refuse()")

    assert code == 451
    assert Message.objects.count() == 0
    assert [p for p in quarantine_dir.rglob("*") if p.is_file()] == []


def test_crafted_leading_field_through_the_worker_does_not_reach_another_user(
    transactional_db, start_filter, quarantine_dir, world
):
    """A message sent to the worker for alice only, whose header section starts with an
    X-Envelope-To-Blocked field naming bob, is quarantined for alice only: bob never sees
    it in his list."""
    raw = b"X-Envelope-To-Blocked: , <bob@example.test>\r\n" + BODY.replace(b"\n", b"\r\n")
    worker = start_filter(
        sink=DjangoQuarantineSink(FileStore(quarantine_dir)),
        policy=QuarantineEverything(destiny="discard", category="SPAM"),
    )
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("a@remote.example")
        client.rcpt("alice@example.test")
        code, _ = client.data(raw)

    assert code == 250
    message = Message.objects.get()
    assert list(message.recipients.values_list("address", flat=True)) == ["alice@example.test"]
    assert not Message.objects.visible_to(world.bob).exists()


def test_release_accepted_by_the_next_hop_is_recorded_even_if_quit_is_not_221(
    world, make_message, smtp_sink
):
    """Once the next hop accepted the DATA (250), the message is delivered: the release is
    recorded as done even when the server's answer to QUIT is not 221, and a second
    release sends nothing (no duplicate)."""

    async def handle_QUIT(server, session, envelope):  # noqa: N802 - aiosmtpd hook
        return "421 4.3.2 Service shutting down"

    smtp_sink.handle_QUIT = handle_QUIT
    message = make_message(raw=BODY, recipients=["alice@example.test"])

    first = release_message(message, user=world.alice)
    second = release_message(message, user=world.alice)

    assert len(smtp_sink.received) == 1
    assert first.ok, first.text
    assert not second.ok
    assert Recipient.objects.get(message=message).released_at is not None


def test_long_finding_is_folded_within_the_line_limit(tmp_path):
    """Header fields of the quarantine block are folded (as amavisd-new folds them, spec
    1.5) so that no line of the file exceeds the 998 characters RFC 5322 2.1.1 allows, even
    for a banned attachment name of thousands of characters chosen by the sender; the value
    reads back unchanged once unfolded."""
    store = FileStore(tmp_path / "store", subdir_levels=1)
    mail_id, _ = generate_mail_id()
    name = "invoice " * 600 + ".exe"
    value = f"BANNED, message contains application/octet-stream,{name}"
    key = store.write(
        category="BANNED",
        mail_id=mail_id,
        message=BODY,
        sender="sender@remote.example",
        recipients=["alice@example.test"],
        findings=[("X-Amavis-Alert", value)],
    )

    lines = store.read(key).split(b"\n")
    assert max(len(line) for line in lines) <= 998
    assert store.load(key).first("X-Amavis-Alert") == " ".join(value.split())
