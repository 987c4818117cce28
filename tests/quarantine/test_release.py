"""release_message against a real SMTP server on loopback."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from quarantine.models import AuditEvent, Recipient
from quarantine.release import release_message
from quarantine.store import get_store, to_crlf

# Lines that SMTP treats specially: a lone dot ends the data unless it is stuffed, a line
# starting with a dot loses one dot on the way unless it is stuffed.
RAW = (
    b"From: Sender <sender@remote.example>\n"
    b"To: alice@example.test, bob@example.test\n"
    b"Subject: =?UTF-8?Q?hello=0D=0ABcc:_victim@example.com?=\n"
    b"Message-ID: <dots@remote.example>\n"
    b"\n"
    b"first line\n"
    b".\n"
    b".hidden line\n"
    b"..two dots\n"
    b"last line\n"
)


def wire(raw: bytes) -> bytes:
    data = to_crlf(raw)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def test_release_delivers_the_original_bytes_unchanged(world, make_message, smtp_sink):
    message = make_message(raw=RAW, recipients=["alice@example.test"],
                           sender="sender@remote.example")

    result = release_message(message, user=world.alice)

    assert result.ok, result.text
    assert result.delivered == ["alice@example.test"]
    assert smtp_sink.received == [("sender@remote.example", ["alice@example.test"], wire(RAW))]
    row = Recipient.objects.get(message=message)
    assert row.released_at is not None
    assert row.released_by == world.alice
    assert row.release_claimed_at is None
    assert AuditEvent.objects.filter(action="release", mail_id=message.mail_id,
                                     username="alice").exists()


def test_quarantine_header_block_is_not_sent(world, make_message, smtp_sink):
    message = make_message(raw=RAW)

    release_message(message, user=world.alice)

    data = smtp_sink.received[0][2]
    assert data.startswith(b"From: Sender")
    for name in (b"X-Envelope-From", b"X-Quarantine-ID", b"Delivered-To", b"Return-Path"):
        assert name not in data


def test_shared_message_is_released_to_the_releasing_user_only(world, make_message, smtp_sink):
    message = make_message(raw=RAW, recipients=["alice@example.test", "bob@example.test"])

    result = release_message(message, user=world.alice)

    assert result.ok
    assert [rcpts for _, rcpts, _ in smtp_sink.received] == [["alice@example.test"]]
    bob_row = Recipient.objects.get(message=message, address="bob@example.test")
    assert bob_row.released_at is None


def test_users_aliases_are_released_together(world, make_message, smtp_sink):
    message = make_message(recipients=["alice@example.test", "alice.alias@example.test",
                                       "bob@example.test"])

    release_message(message, user=world.alice)

    assert sorted(smtp_sink.received[0][1]) == ["alice.alias@example.test", "alice@example.test"]


def test_vadmin_releases_to_every_recipient_in_one_transaction(world, make_message, smtp_sink):
    message = make_message(recipients=["alice@example.test", "bob@example.test"])

    release_message(message, user=world.vadmin)

    assert len(smtp_sink.received) == 1
    assert sorted(smtp_sink.received[0][1]) == ["alice@example.test", "bob@example.test"]
    assert not Recipient.objects.filter(message=message, released_at__isnull=True).exists()


def test_a_second_release_sends_nothing(world, make_message, smtp_sink):
    message = make_message()
    assert release_message(message, user=world.alice).ok

    again = release_message(message, user=world.alice)

    assert not again.ok
    assert "already released" in again.text
    assert len(smtp_sink.received) == 1


def test_null_sender_stays_null(world, make_message, smtp_sink):
    message = make_message(sender="")

    assert release_message(message, user=world.alice).ok

    # aiosmtpd reports the null reverse-path as it came on the wire.
    assert smtp_sink.received[0][0] == "<>"


@pytest.mark.parametrize("answer", ["451 4.3.0 try later", "554 5.7.1 rejected by policy"])
def test_refusal_leaves_the_message_quarantined_and_names_the_answer(
    world, make_message, smtp_sink, answer
):
    smtp_sink.reply = answer
    message = make_message()

    result = release_message(message, user=world.alice)

    assert not result.ok
    assert result.text == f"Release failed: {answer}"
    row = Recipient.objects.get(message=message)
    assert row.released_at is None and row.release_claimed_at is None
    assert AuditEvent.objects.filter(action="release-failed", mail_id=message.mail_id).exists()
    assert get_store(message.origin).exists(message.storage_key)


def test_refused_release_can_be_retried(world, make_message, smtp_sink):
    smtp_sink.reply = "451 4.3.0 try later"
    message = make_message()
    assert not release_message(message, user=world.alice).ok

    smtp_sink.reply = "250 2.0.0 Ok"
    assert release_message(message, user=world.alice).ok
    assert len(smtp_sink.received) == 1


def test_closed_port_is_reported_and_changes_nothing(world, make_message, settings, closed_port):
    settings.RELEASE_SMTP_HOST = "127.0.0.1"
    settings.RELEASE_SMTP_PORT = closed_port
    message = make_message()

    result = release_message(message, user=world.alice)

    assert not result.ok
    assert result.text == (
        f"Release failed: cannot connect to 127.0.0.1:{closed_port} (Connection refused)"
    )
    row = Recipient.objects.get(message=message)
    assert row.released_at is None and row.release_claimed_at is None


def test_virus_is_not_released_by_a_user(world, make_message, smtp_sink):
    message = make_message(category="VIRUS")

    result = release_message(message, user=world.alice)

    assert not result.ok
    assert "administrator" in result.text
    assert smtp_sink.received == []
    assert Recipient.objects.get(message=message).released_at is None


def test_virus_is_released_by_vadmin(world, make_message, smtp_sink):
    message = make_message(category="VIRUS")

    assert release_message(message, user=world.vadmin).ok
    assert len(smtp_sink.received) == 1


def test_virus_is_released_by_a_user_when_the_setting_allows(
    world, make_message, smtp_sink, settings
):
    settings.RELEASE_VIRUS_BY_USERS = True
    message = make_message(category="VIRUS")

    assert release_message(message, user=world.alice).ok


def test_a_fresh_claim_blocks_another_release(world, make_message, smtp_sink):
    message = make_message()
    Recipient.objects.filter(message=message).update(release_claimed_at=timezone.now())

    result = release_message(message, user=world.alice)

    assert not result.ok
    assert smtp_sink.received == []


def test_a_claim_left_by_a_dead_worker_expires(world, make_message, smtp_sink):
    message = make_message()
    Recipient.objects.filter(message=message).update(
        release_claimed_at=timezone.now() - timedelta(minutes=11)
    )

    assert release_message(message, user=world.alice).ok
    assert len(smtp_sink.received) == 1


def _rewrite_envelope(message, sender_field: bytes) -> None:
    """Replace the stored file by a hand-made one (as a hostile indexed directory could)."""
    path = get_store(message.origin).path(message.storage_key)
    path.write_bytes(
        b"X-Envelope-From: " + sender_field + b"\n"
        b"X-Envelope-To: <alice@example.test>\n"
        b"X-Quarantine-ID: <" + message.mail_id.encode() + b">\n" + RAW
    )


@pytest.mark.parametrize("sender", [
    b"<evil@remote.example\rRCPT TO:<victim@elsewhere.example>>",
    b"<evil@remote.example\x00>",
    b"<evil@remote.example> NOTIFY=NEVER",
    b"<evil@remote.example>>",
])
def test_envelope_sender_with_command_characters_is_refused(
    world, make_message, smtp_sink, sender
):
    message = make_message()
    _rewrite_envelope(message, sender)

    result = release_message(message, user=world.alice)

    assert not result.ok
    assert result.text.startswith("Release refused: the envelope sender")
    assert "\r" not in result.text and "\x00" not in result.text
    assert smtp_sink.received == []
    assert Recipient.objects.get(message=message).release_claimed_at is None


def test_recipient_with_crlf_is_refused(world, make_message, smtp_sink):
    message = make_message(recipients=["bob@example.test"])
    Recipient.objects.filter(message=message).update(
        address="bob@example.test\r\nRCPT TO:<victim@elsewhere.example>"
    )

    result = release_message(message, user=world.vadmin)

    assert not result.ok
    assert result.text.startswith("Release refused: the recipient")
    assert smtp_sink.received == []


def test_file_of_another_message_is_not_sent(world, make_message, smtp_sink):
    message = make_message()
    path = get_store(message.origin).path(message.storage_key)
    path.write_bytes(b"X-Envelope-From: <a@remote.example>\nX-Quarantine-ID: <OtherId12345>\n"
                     + RAW)

    result = release_message(message, user=world.alice)

    assert not result.ok
    assert "another message" in result.text
    assert smtp_sink.received == []


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_releases_deliver_once(world, make_message, smtp_sink):
    # The server holds its answer back so that both releases are in flight at once.
    smtp_sink.delay = 0.5
    message = make_message()
    barrier = threading.Barrier(2)
    results = []

    def run() -> None:
        try:
            barrier.wait(timeout=10)
            results.append(release_message(message, user=world.alice))
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(smtp_sink.received) == 1
    assert sorted(r.ok for r in results) == [False, True]
    assert Recipient.objects.get(message=message).released_at is not None
