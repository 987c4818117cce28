"""Retention: age and size limits applied to rows and files together."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import call_command

from quarantine import retention
from quarantine.models import AuditEvent, Message
from quarantine.retention import prune_quarantine

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

pytestmark = pytest.mark.django_db


@pytest.fixture
def pruned(django_capture_on_commit_callbacks):
    """Run prune_quarantine and let its after-commit file removal happen, as in production."""

    def run(**kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return prune_quarantine(now=NOW, **kwargs)

    return run


def _aged(make_message, days: float, **kwargs) -> Message:
    return make_message(received_at=NOW - timedelta(days=days), **kwargs)


def test_messages_older_than_the_age_limit_are_deleted_with_their_files(
    make_message, quarantine_dir, pruned
):
    old = [_aged(make_message, 31), _aged(make_message, 400, category="VIRUS")]
    kept = [_aged(make_message, 29), _aged(make_message, 1)]

    summary = pruned(max_age_days=30, max_size_mb=0)

    assert summary.expired == 2
    assert set(Message.objects.values_list("id", flat=True)) == {m.id for m in kept}
    for message in old:
        assert not (quarantine_dir / message.storage_key).exists()
    for message in kept:
        assert (quarantine_dir / message.storage_key).exists()


def test_age_limit_comes_from_settings_and_zero_keeps_forever(make_message, settings, pruned):
    ancient = _aged(make_message, 3000)
    settings.QUARANTINE_MAX_AGE_DAYS = 0
    settings.QUARANTINE_MAX_SIZE_MB = 0

    assert pruned().expired == 0
    assert Message.objects.filter(id=ancient.id).exists()

    settings.QUARANTINE_MAX_AGE_DAYS = 10
    assert pruned().expired == 1
    assert not Message.objects.exists()


def test_oldest_messages_go_until_the_store_fits_its_size_limit(
    make_message, quarantine_dir, pruned
):
    big = b"x" * (400 * 1024)
    messages = [
        _aged(make_message, days, body=big.decode(), category="VIRUS")
        for days in (5, 4, 3, 2, 1)
    ]
    total = sum(m.file_size for m in messages)
    assert 2 * 1024 * 1024 < total < 3 * 1024 * 1024

    summary = pruned(max_age_days=0, max_size_mb=1)

    remaining = list(Message.objects.order_by("received_at").values_list("id", flat=True))
    assert summary.over_size == 3
    assert remaining == [m.id for m in messages[3:]]
    assert sum(m.file_size for m in messages[3:]) <= 1024 * 1024
    for message in messages[:3]:
        assert not (quarantine_dir / message.storage_key).exists()
    for message in messages[3:]:
        assert (quarantine_dir / message.storage_key).exists()


def test_size_limit_deletes_in_batches(make_message, monkeypatch, pruned):
    monkeypatch.setattr(retention, "BATCH_SIZE", 2)
    big = "y" * (300 * 1024)
    messages = [_aged(make_message, 10 - n, body=big, category="BANNED") for n in range(7)]

    summary = pruned(max_age_days=0, max_size_mb=1)

    assert summary.over_size == 4
    assert set(Message.objects.values_list("id", flat=True)) == {m.id for m in messages[4:]}


def test_store_within_its_limits_is_left_alone_and_not_audited(make_message, pruned):
    _aged(make_message, 1)

    summary = pruned(max_age_days=30, max_size_mb=500)

    assert (summary.expired, summary.over_size, summary.temporary_files) == (0, 0, 0)
    assert Message.objects.count() == 1
    assert not AuditEvent.objects.exists()


def test_prune_is_recorded_in_the_audit_log(make_message, pruned):
    _aged(make_message, 50)

    pruned(max_age_days=30, max_size_mb=0)

    event = AuditEvent.objects.get()
    assert (event.action, event.username, event.user) == ("prune", "system", None)
    assert "pruned 1 messages (older than 30 days)" in event.detail


def test_stale_temporary_files_are_removed(quarantine_dir, pruned):
    sub = quarantine_dir / "a"
    sub.mkdir()
    stale = sub / ".tmp-spam-abcdefgh1234.gz-0a0a0a"
    fresh = sub / ".tmp-spam-bcdefghi1234.gz-0b0b0b"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (1, 1))

    summary = pruned(max_age_days=30, max_size_mb=0)

    assert summary.temporary_files == 1
    assert not stale.exists()
    assert fresh.exists()


def test_prunequarantine_command_prints_the_summary(
    make_message, quarantine_dir, django_capture_on_commit_callbacks
):
    old = make_message(received_at=datetime.now(UTC) - timedelta(days=45))
    make_message()
    out = StringIO()

    with django_capture_on_commit_callbacks(execute=True):
        call_command("prunequarantine", "--max-age-days", "30", "--max-size-mb", "0", stdout=out)

    assert out.getvalue() == (
        "pruned 1 messages (older than 30 days), 0 messages (no size limit), "
        "0 temporary files\n"
    )
    assert not (quarantine_dir / old.storage_key).exists()
    assert Message.objects.count() == 1
