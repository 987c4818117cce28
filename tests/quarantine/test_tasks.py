"""The quarantine's Celery tasks, run in-process as they are when no broker is configured."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from quarantine.models import Message
from quarantine.tasks import IndexFailed, index_quarantine_task, prune_quarantine_task

SAMPLES = Path(__file__).parent / "samples"

pytestmark = pytest.mark.django_db


def test_index_task_runs_in_process_through_delay(tmp_path, settings):
    assert settings.CELERY_TASK_ALWAYS_EAGER
    root = tmp_path / "amavis"
    shutil.copytree(SAMPLES / "amavis", root)

    result = index_quarantine_task.delay([str(root)])

    assert result.get() == (
        f"indexed {root}: 4 new, 0 updated, 0 unchanged, 0 unreadable, 0 skipped, 0 removed"
    )
    assert Message.objects.count() == 4


def test_index_task_defaults_to_the_quarantine_dir_and_fails_on_a_missing_one(
    tmp_path, quarantine_dir
):
    shutil.copytree(SAMPLES / "amavis-subdirs", quarantine_dir, dirs_exist_ok=True)

    summary = index_quarantine_task.delay().get()
    with pytest.raises(IndexFailed) as missing:
        index_quarantine_task.delay([str(tmp_path / "gone")]).get()

    assert summary.startswith(f"indexed {quarantine_dir.resolve()}: 3 new")
    assert str(missing.value) == (
        f"1 of 1 quarantine directories not indexed: {tmp_path / 'gone'}: "
        "cannot open directory (No such file or directory)"
    )
    assert Message.objects.count() == 3


def test_prune_task_runs_in_process_through_delay(
    make_message, quarantine_dir, django_capture_on_commit_callbacks
):
    old = make_message(received_at=datetime.now(UTC) - timedelta(days=40))
    new = make_message()
    old_file = quarantine_dir / old.storage_key

    with django_capture_on_commit_callbacks(execute=True):
        summary = prune_quarantine_task.delay().get()

    assert summary.startswith("pruned 1 messages (older than 30 days)")
    assert list(Message.objects.values_list("id", flat=True)) == [new.id]
    assert not old_file.exists()


def test_prune_task_is_the_one_celery_beat_runs(settings):
    names = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert prune_quarantine_task.name in names
