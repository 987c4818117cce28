"""Edges of the quarantine's background jobs: retention, deletion, clearing, Celery config.

Each test runs on real files in a real store and the real database; interleavings of two
jobs are made deterministic by running the second one at a chosen point of the first.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import pytest

from quarantine import deletion, retention
from quarantine.deletion import clear_quarantine
from quarantine.indexer import index_directory
from quarantine.models import Message
from quarantine.retention import prune_quarantine

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _files(root) -> list:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


# Retention ---------------------------------------------------------------------------


def test_a_prune_run_during_another_does_not_delete_more_than_the_size_excess(
    transactional_db, make_message, quarantine_dir, monkeypatch
):
    """Two retention runs at once (a manual `prunequarantine` while beat's one runs) must
    together delete only the oldest messages needed to bring the store under
    QUARANTINE_MAX_SIZE_MB: the same result as one run. Messages within the limit stay."""
    big = "x" * (400 * 1024)
    messages = [
        make_message(received_at=NOW - timedelta(days=d), body=big, category="VIRUS")
        for d in (6, 5, 4, 3, 2, 1)
    ]
    limit = 1024 * 1024
    # What one run keeps: the newest messages whose files fit within the limit.
    expected_kept, total = [], sum(m.file_size for m in messages)
    for m in messages:
        if total > limit:
            total -= m.file_size
        else:
            expected_kept.append(m.id)
    assert expected_kept, "the test needs some messages within the limit"

    # One message per batch, as with a large quarantine where a run takes many batches;
    # the second run starts (and finishes) after the first run's first batch committed.
    monkeypatch.setattr(retention, "BATCH_SIZE", 1)
    real_delete = retention.delete_messages
    state = {"second_run_done": False}

    def delete_then_second_run(*args, **kwargs):
        count = real_delete(*args, **kwargs)
        if not state["second_run_done"]:
            state["second_run_done"] = True
            prune_quarantine(now=NOW, max_age_days=0, max_size_mb=1)
        return count

    monkeypatch.setattr(retention, "delete_messages", delete_then_second_run)
    prune_quarantine(now=NOW, max_age_days=0, max_size_mb=1)

    kept = sorted(Message.objects.values_list("id", flat=True))
    assert kept == sorted(expected_kept), (
        f"two overlapping runs kept {len(kept)} messages, one run keeps "
        f"{len(expected_kept)}: messages within the size limit were deleted"
    )


def test_prune_removes_an_old_file_left_without_its_row_so_the_indexer_does_not_revive_it(
    transactional_db, make_message, quarantine_dir, monkeypatch, world
):
    """deletion.py promises: "a crash leaves at worst an orphan file that
    `prunequarantine` removes". A user deletes a message; the rows are committed but the
    worker dies before the file is unlinked. The next `prunequarantine` must remove that
    orphan file (it is old, so it is no file being written), and the next index run must
    not bring the deleted message back into the user's list."""
    message = make_message(recipients=["alice@example.test"])
    path = quarantine_dir / message.storage_key

    # The process dies between the commit and the removal of the file.
    monkeypatch.setattr(deletion, "_remove_files", lambda files, errors=None: None)
    deletion.delete_message(message, user=world.alice)
    monkeypatch.undo()
    assert not Message.objects.exists() and path.exists()
    hour_ago = time.time() - 2 * 3600
    os.utime(path, (hour_ago, hour_ago))

    prune_quarantine(max_age_days=30, max_size_mb=0)
    summary = index_directory(quarantine_dir)

    assert not path.exists(), "prunequarantine left the orphan file of a deleted message"
    assert summary.new == 0 and not Message.objects.exists(), (
        "the message the user deleted is back in the index"
    )


# Clearing the quarantine ---------------------------------------------------------------


def test_clear_quarantine_during_an_index_run_leaves_no_rows_without_files(
    transactional_db, make_message, quarantine_dir, monkeypatch, world
):
    """vadmin's "Clear the quarantine" must be complete and safe against an index run
    (cron, `indexquarantine --async`) that overlaps it: afterwards no Message row may be
    left, least of all one whose file is gone. Here the index run lists the store while
    the clear is removing files (after its row deletion committed)."""
    for _ in range(4):
        make_message(recipients=["alice@example.test"])
    assert len(_files(quarantine_dir)) == 4

    real_remove = deletion._remove_files

    def remove_with_index_run_overlapping(files, errors=None):
        # The concurrent index run lists the store before the files are unlinked.
        index_directory(quarantine_dir)
        real_remove(files, errors)

    monkeypatch.setattr(deletion, "_remove_files", remove_with_index_run_overlapping)
    removed = clear_quarantine(user=world.vadmin)

    assert removed == 4
    assert _files(quarantine_dir) == []
    dangling = [
        m.storage_key for m in Message.objects.all()
        if not (quarantine_dir / m.storage_key).exists()
    ]
    assert Message.objects.count() == 0, (
        f"after the clear {Message.objects.count()} messages are listed, "
        f"{len(dangling)} of them without a file"
    )


def test_clear_quarantine_removes_files_not_yet_indexed(
    transactional_db, make_message, quarantine_dir, world
):
    """"Clear the quarantine" empties the quarantine: a held file already in the store but
    not indexed yet (amavisd-new wrote it, the periodic index run has not seen it) must not
    reappear as a message at the next index run after the clear. A file written in the
    last few minutes is kept: the filter may be indexing it right now."""
    indexed = make_message(recipients=["alice@example.test"])
    # A file put in the store by the writer; its index row does not exist yet.
    unindexed = make_message(recipients=["alice@example.test"])
    Message.objects.filter(id=unindexed.id).delete()
    old = time.time() - 600
    os.utime(quarantine_dir / unindexed.storage_key, (old, old))
    # And one the filter is storing right now.
    young = make_message(recipients=["alice@example.test"])
    Message.objects.filter(id=young.id).delete()

    clear_quarantine(user=world.vadmin)
    summary = index_directory(quarantine_dir)

    assert not (quarantine_dir / indexed.storage_key).exists()
    assert not (quarantine_dir / unindexed.storage_key).exists()
    assert summary.new == 1, "a message came back right after the quarantine was cleared"
    assert list(Message.objects.values_list("storage_key", flat=True)) == [young.storage_key]


# Celery ------------------------------------------------------------------------------


JOBS = (
    "quarantine.tasks.index_quarantine_task",
    "quarantine.tasks.prune_quarantine_task",
    "directory.tasks.sync_directory_task",
)


@pytest.mark.parametrize("name", JOBS)
def test_periodic_jobs_are_acknowledged_late_so_a_worker_restart_does_not_lose_them(name):
    """The jobs are idempotent (a second run finds nothing to do): they must be
    acknowledged after they ran (acks_late, with reject_on_worker_lost), so that a worker
    killed or restarted mid-run (a deploy, the OOM killer) leaves the message in the broker
    for the next worker instead of dropping the run until the next schedule."""
    from spamviewer.celery import app

    app.loader.import_default_modules()
    task = app.tasks[name]
    assert task.acks_late, f"{name} is acknowledged before it runs (acks_late is off)"


@pytest.mark.parametrize("name", JOBS)
def test_periodic_jobs_that_fail_or_time_out_are_acknowledged_not_run_again_at_once(name):
    """A job that fails (the directory is down, a store directory cannot be read) raises
    and ends in state FAILURE. Acknowledged late, its message must still be acknowledged
    then: one left unacknowledged or requeued would be run again at once and fail again,
    in a loop. Celery does so unless task_acks_on_failure_or_timeout is False; the next
    try is the next scheduled run."""
    from spamviewer.celery import app

    app.loader.import_default_modules()
    task = app.tasks[name]
    assert task.acks_on_failure, f"{name} is requeued when it fails"
    assert task.acks_on_timeout, f"{name} is requeued when it reaches its time limit"


@pytest.mark.parametrize("name", JOBS)
def test_periodic_jobs_have_a_time_limit(name):
    """A job stuck on a hung NFS store, a locked table or an unanswering directory must be
    stopped by a (soft and hard) time limit, or it holds a worker process for ever and the
    next scheduled runs queue up behind it."""
    from spamviewer.celery import app

    app.loader.import_default_modules()
    task = app.tasks[name]
    hard = task.time_limit or app.conf.task_time_limit
    soft = task.soft_time_limit or app.conf.task_soft_time_limit
    assert hard or soft, f"{name} has no time limit (task or task_time_limit setting)"



def test_a_clear_between_an_index_runs_parse_and_its_insert_leaves_no_row_without_file(
    transactional_db, make_message, quarantine_dir, monkeypatch, world
):
    """An index run has parsed a file not indexed yet; vadmin's clear removes that file
    (and has already dropped its pending record) before the run inserts: the run inserts
    no row for a file that is gone."""
    from quarantine import indexer

    unindexed = make_message(recipients=["alice@example.test"])
    Message.objects.filter(id=unindexed.id).delete()
    old = time.time() - 600
    os.utime(quarantine_dir / unindexed.storage_key, (old, old))
    insert = indexer._insert_batch

    def clear_then_insert(pending, summary, origins):
        clear_quarantine(user=world.vadmin)
        return insert(pending, summary, origins)

    monkeypatch.setattr(indexer, "_insert_batch", clear_then_insert)
    summary = index_directory(quarantine_dir)

    assert not (quarantine_dir / unindexed.storage_key).exists()
    assert summary.new == 0 and not Message.objects.exists()
