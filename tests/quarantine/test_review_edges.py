"""Edges where the filter's quarantine writes, index runs and deletions overlap on a real
PostgreSQL, and where the relay map's database is replaced on a disk that fills up.

"Never a row that points at nothing": whoever removes a quarantine file removes the rows
any other writer made of it, under the lock index runs and deletions share.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

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
