"""Edges where the filter's quarantine writes, index runs and deletions overlap on a real
PostgreSQL, and where the relay map's database is replaced on a disk that fills up.

"Never a row that points at nothing": whoever removes a quarantine file removes the rows
any other writer made of it, under the lock index runs and deletions share.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
from django.db import connection, connections, transaction

from quarantine.indexer import index_directory
from quarantine.models import Message, PendingFileDeletion, Recipient
from quarantine.sink import DjangoQuarantineSink
from quarantine.store import FileStore
from tests.conftest import build_mail
from tests.e2e.postfix import wait_until
from tests.quarantine.test_disk_faults_edges import store_files
from tests.quarantine.test_jobs_failures_edges import _dangling


def _lock_waiters() -> int:
    """Sessions of the test database waiting for a lock (a fresh connection each time, so
    that no transaction's snapshot of pg_stat_activity is read)."""
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return cursor.fetchone()[0]
    finally:
        connections.close_all()


def _in_thread(target, *args) -> threading.Thread:
    def run() -> None:
        try:
            target(*args)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_write_given_up_while_an_index_run_takes_its_file_leaves_no_row_without_a_file(
    transactional_db, tmp_path
):
    """The filter's insert waits (a lock held elsewhere); an index run lists the file the
    filter just wrote and waits for the filter's uncommitted row. The worker gives the
    write up: its file goes. The index run then commits its own row of that file, which
    must not outlive the file (the client's retry is the only copy)."""
    root = tmp_path / "q"
    root.mkdir()
    sink = DjangoQuarantineSink(FileStore(root))
    given_up = threading.Event()
    outcome: dict[str, object] = {}

    async def worker() -> None:
        write = asyncio.ensure_future(sink.write(
            category="VIRUS", message=build_mail(subject="given up"),
            sender="sender@remote.example", recipients=["alice@example.test"],
            reasons=["Eicar-Test-Signature"],
        ))
        assert await asyncio.to_thread(wait_until, lambda: _lock_waiters() == 1, 20)
        outcome["index"] = _in_thread(lambda: outcome.update(summary=index_directory(root)))
        assert await asyncio.to_thread(wait_until, lambda: _lock_waiters() == 2, 20)
        write.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            outcome["mail_id"] = await write
        given_up.set()

    with transaction.atomic():
        with connection.cursor() as cursor:
            # Inserts into the recipients' table wait: the filter's first, then the index
            # run's, once the filter's row no longer stands in its way.
            cursor.execute(f"LOCK TABLE {Recipient._meta.db_table} IN SHARE MODE")
        loop = _in_thread(asyncio.run, worker())
        assert given_up.wait(30)
    loop.join(30)
    outcome["index"].join(30)
    assert not loop.is_alive() and not outcome["index"].is_alive()

    assert "mail_id" not in outcome
    assert _dangling() == []
    assert sorted(Message.objects.values_list("storage_key", flat=True)) == store_files(root)
    assert PendingFileDeletion.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_two_users_deleting_their_copies_of_one_message_at_once_remove_it(
    world, make_message, settings
):
    """alice and bob delete their copies of a shared message at the same moment: the
    message must go with its last recipient, not stay behind with none (a row the viewer
    shows nobody and retention alone would ever remove, its file kept)."""
    from quarantine.deletion import delete_message

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only: SQLite lets one transaction write at a time")
    message = make_message(recipients=["alice@example.test", "bob@example.test"])
    path = FileStore(settings.QUARANTINE_DIR).path(message.storage_key)
    alice_deleted = threading.Event()
    commit = threading.Event()

    def alice() -> None:
        # Her deletion is done but not committed while bob's runs.
        with transaction.atomic():
            delete_message(message, user=world.alice)
            alice_deleted.set()
            commit.wait(10)

    first = _in_thread(alice)
    assert alice_deleted.wait(10)
    second = _in_thread(lambda: delete_message(message, user=world.bob))
    # bob's deletion either waits for alice's transaction or finishes; then alice commits.
    wait_until(lambda: _lock_waiters() > 0 or not second.is_alive(), timeout=3)
    commit.set()
    first.join(10)
    second.join(10)

    assert not Recipient.objects.filter(message_id=message.id).exists()
    assert not Message.objects.filter(id=message.id).exists()
    assert wait_until(lambda: not path.exists(), timeout=5)
