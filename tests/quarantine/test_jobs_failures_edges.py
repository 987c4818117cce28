"""Edges of the quarantine's jobs when something goes wrong.

- An index or prune job that could not do its work ends as a failed Celery job (state
  FAILURE, task_failure signal, a message naming the cause), after doing what it could,
  and is acknowledged rather than delivered again; run on a real worker on Redis.
- An index run and a deletion that overlap on PostgreSQL never leave a message row whose
  file is gone: the interleavings are forced at chosen points, with a second connection.
- The same code path works on SQLite, where the lock is the database's write lock.
"""

from __future__ import annotations

import json
import os
import queue as queues
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.db import connection

from quarantine import indexer
from quarantine.deletion import clear_quarantine, delete_message
from quarantine.indexer import index_directory
from quarantine.models import Message, PendingFileDeletion
from quarantine.tasks import IndexFailed, PruneFailed, prune_quarantine_task
from tests.directory.test_sync_task import job_signals, left_in_broker, project_worker

SAMPLES = Path(__file__).parent / "samples"
ROOT = Path(__file__).resolve().parents[2]
INDEX = "quarantine.tasks.index_quarantine_task"
PRUNE = "quarantine.tasks.prune_quarantine_task"


def _dangling() -> list[str]:
    """Message rows whose file is not in the store."""
    return [
        f"{origin}/{key}"
        for origin, key in Message.objects.values_list("origin", "storage_key")
        if not (Path(origin) / key).exists()
    ]


def _age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


# Failed jobs ---------------------------------------------------------------------------


def test_an_index_job_indexes_every_directory_then_fails_naming_those_it_could_not_read(
    transactional_db, tmp_path
):
    """`indexquarantine --async` (or a scheduled run) over several directories: the ones
    that can be read are indexed, then the job fails, naming each one that could not be
    (here one that is gone and one that loops on itself, which not even root can open)."""
    good = tmp_path / "amavis"
    shutil.copytree(SAMPLES / "amavis", good)
    looping = tmp_path / "looping"
    looping.symlink_to(looping)
    gone = tmp_path / "gone"

    with (job_signals() as (started, failures),
          project_worker("spamviewer-index-failure-test") as (app, queue)):
        result = app.tasks[INDEX].apply_async([[str(looping), str(good), str(gone)]],
                                              queue=queue)
        with pytest.raises(IndexFailed) as raised:
            result.get(timeout=60)

    assert result.state == "FAILURE"
    message = str(result.result)
    assert message == str(raised.value)
    assert message.startswith("2 of 3 quarantine directories not indexed: "), message
    assert str(looping) in message and str(gone) in message and str(good) not in message
    assert Message.objects.count() == 4
    assert set(Message.objects.values_list("origin", flat=True)) == {str(good.resolve())}
    assert [(task_id, str(exc)) for task_id, exc in failures] == [(result.id, message)]
    assert started.count(result.id) == 1
    assert left_in_broker(queue, result.id) == []


def test_an_index_job_whose_directories_all_read_succeeds_with_one_line_each(
    transactional_db, tmp_path
):
    first, second = tmp_path / "one", tmp_path / "two"
    shutil.copytree(SAMPLES / "amavis", first)
    shutil.copytree(SAMPLES / "amavis-subdirs", second)

    with (job_signals() as (started, failures),
          project_worker("spamviewer-index-success-test") as (app, queue)):
        result = app.tasks[INDEX].apply_async([[str(first), str(second)]], queue=queue)
        summary = result.get(timeout=60)

    assert result.state == "SUCCESS" and failures == []
    assert summary.splitlines() == [
        f"indexed {first}: 4 new, 0 updated, 0 unchanged, 0 unreadable, 0 skipped, 0 removed",
        f"indexed {second}: 3 new, 0 updated, 0 unchanged, 0 unreadable, 0 skipped, 0 removed",
    ]


def test_a_prune_job_that_cannot_remove_a_file_fails_naming_it_and_the_next_run_does(
    transactional_db, make_message, quarantine_dir
):
    """Retention deletes an expired message but its file cannot be unlinked (here the store
    directory is immutable; a read-only or failing disk does the same): the disk is not
    freed, so the job fails naming the file and why. The row is gone, the file keeps its
    pending deletion, and the next run, once the store is writable again, removes it."""
    old = make_message(received_at=datetime.now(UTC) - timedelta(days=40))
    path = quarantine_dir / old.storage_key
    subprocess.run(["chattr", "+i", str(path.parent)], check=True)
    try:
        with (job_signals() as (started, failures),
              project_worker("spamviewer-prune-failure-test") as (app, queue)):
            result = app.tasks[PRUNE].apply_async(queue=queue)
            with pytest.raises(PruneFailed):
                result.get(timeout=60)
    finally:
        subprocess.run(["chattr", "-i", str(path.parent)], check=True)

    assert result.state == "FAILURE"
    message = str(result.result)
    assert message.startswith("pruned 1 messages (older than 30 days)"), message
    assert f"{path}: cannot delete (Operation not permitted)" in message
    assert [task_id for task_id, _ in failures] == [result.id]
    assert started.count(result.id) == 1 and left_in_broker(queue, result.id) == []
    assert not Message.objects.exists() and path.exists()
    assert PendingFileDeletion.objects.filter(storage_key=old.storage_key).exists()

    summary = prune_quarantine_task.delay().get()

    assert summary.endswith(", 1 left-over files of deleted messages"), summary
    assert not path.exists() and not PendingFileDeletion.objects.exists()


# Index runs and deletions on PostgreSQL ------------------------------------------------


def _blocked(pid: int) -> bool:
    """Whether the backend `pid` waits for a lock."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted)",
                       [pid])
        return cursor.fetchone()[0]


def test_a_clear_committed_between_an_index_batchs_check_and_its_commit_leaves_no_row_without_file(
    transactional_db, make_message, quarantine_dir, monkeypatch, world
):
    """An index run's batch has checked its files (there, no pending deletion); vadmin's
    clear then runs, in another connection, up to its end or up to a lock it has to wait
    for; only then does the batch insert and commit. Under READ COMMITTED the batch cannot
    see a clear that commits after its check, so the clear must wait for the batch: in the
    end neither the file nor a row for it may be left."""
    assert connection.vendor == "postgresql", "run with DATABASE_URL pointing at PostgreSQL"
    unindexed = make_message(recipients=["alice@example.test"])
    Message.objects.filter(id=unindexed.id).delete()
    path = quarantine_dir / unindexed.storage_key
    _age(path, 600)  # settled: the clear removes it

    pids: queues.Queue = queues.Queue()
    cleared = threading.Event()
    outcome: list = []

    def clear() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pids.put(cursor.fetchone()[0])
            outcome.append(clear_quarantine(user=world.vadmin))
        except BaseException as exc:  # reported by the test below
            outcome.append(exc)
        finally:
            connection.close()
            cleared.set()

    clearing = threading.Thread(target=clear)
    real_deleting = indexer._deleting

    def check_then_let_the_clear_run(batch, origins):
        deleting = real_deleting(batch, origins)
        if not clearing.is_alive() and not cleared.is_set():
            clearing.start()
            pid = pids.get(timeout=30)
            deadline = time.monotonic() + 30
            while not cleared.is_set() and not _blocked(pid):
                assert time.monotonic() < deadline, "the clear neither ended nor waited"
                time.sleep(0.01)
        return deleting

    monkeypatch.setattr(indexer, "_deleting", check_then_let_the_clear_run)
    try:
        summary = index_directory(quarantine_dir)
    finally:
        clearing.join(timeout=60)

    assert cleared.is_set() and outcome == [1], outcome
    assert not path.exists()
    assert _dangling() == [], (
        f"the index run inserted a row for a file the clear removed ({summary})"
    )
    assert not Message.objects.exists()


def test_a_users_deletion_does_not_wait_for_the_rest_of_a_long_index_run(
    transactional_db, make_message, quarantine_dir, monkeypatch, world
):
    """The lock an index run takes lasts one batch, not the run: a user who deletes a
    message while a large directory is being indexed is not held until the run ends."""
    assert connection.vendor == "postgresql", "run with DATABASE_URL pointing at PostgreSQL"
    mine = make_message(recipients=["alice@example.test"])
    for _ in range(3):
        other = make_message(recipients=["bob@example.test"])
        Message.objects.filter(id=other.id).delete()
    monkeypatch.setattr(indexer, "BATCH_SIZE", 1)
    real_parse = indexer.parse_file
    parsed: list[str] = []
    outcome: list = []

    def delete_from_the_viewer() -> None:
        try:
            with connection.cursor() as cursor:
                # Waiting for a lock held by the index run fails quickly instead of hanging.
                cursor.execute("SET lock_timeout = '3s'")
            outcome.append(delete_message(Message.objects.get(id=mine.id), user=world.alice))
        except BaseException as exc:  # reported by the test below
            outcome.append(exc)
        finally:
            connection.close()

    def parse_with_a_deletion_meanwhile(store, key, st):
        parsed.append(key)
        if len(parsed) == 2:
            # The first batch is committed; the run goes on with the next files.
            viewer = threading.Thread(target=delete_from_the_viewer)
            viewer.start()
            viewer.join(timeout=30)
        return real_parse(store, key, st)

    monkeypatch.setattr(indexer, "parse_file", parse_with_a_deletion_meanwhile)
    summary = index_directory(quarantine_dir)

    assert outcome == [1], outcome
    assert summary.new == 3 and len(parsed) == 3
    assert not Message.objects.filter(id=mine.id).exists()
    assert not (quarantine_dir / mine.storage_key).exists()
    assert _dangling() == []


# The same code on SQLite ---------------------------------------------------------------

SQLITE_SCRIPT = textwrap.dedent(
    """
    import json, os, sqlite3, sys, time
    import django

    django.setup()
    from quarantine import indexer
    from quarantine.deletion import clear_quarantine
    from quarantine.indexer import index_directory
    from quarantine.models import Message
    from quarantine.store import FileStore

    root, db = sys.argv[1], sys.argv[2]
    store = FileStore(root, subdir_levels=1)
    keys = [
        store.write(category="SPAM", mail_id=f"sqlite{n:06d}", sender="s@remote.example",
                    recipients=["alice@example.test"],
                    message=b"From: s@remote.example\\nSubject: hi\\n\\nhello\\n")
        for n in range(2)
    ]
    other_writer = []
    real_deleting = indexer._deleting

    def check(batch, origins):
        deleting = real_deleting(batch, origins)
        # A deletion in another connection, between the batch's check and its commit.
        other = sqlite3.connect(db, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            other_writer.append("went through")
        except sqlite3.OperationalError as exc:
            other_writer.append(str(exc))
        finally:
            other.close()
        return deleting

    indexer._deleting = check
    summary = index_directory(root)
    indexer._deleting = real_deleting
    old = time.time() - 600
    for key in keys:
        os.utime(store.path(key), (old, old))
    removed = clear_quarantine(user=None)
    print(json.dumps({
        "new": summary.new, "other_writer": other_writer, "removed": removed,
        "rows": Message.objects.count(), "files": [k for k in keys if store.exists(k)],
    }))
    """
)


def test_index_runs_and_clears_work_on_sqlite_where_the_batch_holds_the_write_lock(tmp_path):
    """On SQLite (the embedded setup) the lock is the database's single write lock, taken
    before the batch's check: a deletion in another connection waits for the batch (here
    it is refused at once: no busy timeout) instead of committing in between."""
    db = tmp_path / "db.sqlite3"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "spamviewer.settings",
        "SPAMVIEWER_VAR_DIR": str(tmp_path),
        "SPAMVIEWER_IGNORE_DOTENV": "1",
        "DATABASE_URL": f"sqlite:///{db}",
        "QUARANTINE_DIR": str(tmp_path / "store"),
    }
    for name in ("REDIS_URL", "EMBEDDED_BROKER"):
        env.pop(name, None)
    (tmp_path / "store").mkdir()
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT,
                   env=env, check=True, capture_output=True, timeout=300)

    run = subprocess.run(
        [sys.executable, "-c", SQLITE_SCRIPT, str(tmp_path / "store"), str(db)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )

    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"new": 2, "other_writer": ["database is locked"], "removed": 2,
                      "rows": 0, "files": []}
