"""Deleting quarantined mail: one recipient's copy, a user's mail, or the whole quarantine.

A message is shared by its recipients: deleting it for one user removes that user's
recipient rows; the message row and its file go once no recipient is left. Rows go first
(in a transaction) and files after the commit, so a crash leaves at worst an orphan file,
never a row that points at nothing. The transaction that deletes the rows also records
each file as a PendingFileDeletion, dropped once the file is unlinked: the indexer never
indexes a file that has one, and `prunequarantine` removes what a crash or a failed
unlink left behind.

An index run checks, in the transaction that inserts a batch of rows, that each file is
still there and has no pending deletion. Under PostgreSQL's READ COMMITTED that check does
not see a deletion committed after it, so both sides take one lock (lock_store_files):
a deletion waits for the batch (and then deletes the rows the batch inserted), or the batch
waits for the deletion (and then sees its records).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from django.db import DatabaseError, transaction
from django.db.transaction import TransactionManagementError

from directory.models import Address
from quarantine.models import AuditEvent, Message, PendingFileDeletion, Recipient, record_event
from quarantine.store import FileStore, StoreError, get_store, name_info

log = logging.getLogger(__name__)

# Files unlinked between two deletions of their pending records.
BATCH_SIZE = 1000
# A held file younger than this may be one the filter is still indexing: a clear keeps it.
_YOUNG_SECONDS = 300
# PostgreSQL advisory lock key of lock_store_files ("SPAMVIEW"), unique within the database.
_FILES_LOCK_KEY = 0x5350_414D_5649_4557


def lock_store_files(*, indexing: bool = False) -> None:
    """Take, until the end of the current transaction, the lock that orders an index run's
    batch (`indexing`: from before its check of the files to its commit) against the
    deletions that record pending deletions of files. Call it first in the transaction.

    On PostgreSQL it is a transaction-level advisory lock: an index batch holds it alone,
    deletions share it, so that users' deletions never wait for one another here, and only
    for one batch of an index run, never for the whole run. SQLite lets one transaction
    write at a time: a write (of no row) takes that write lock now rather than at the
    first insert, so the other side waits for the commit (busy timeout) instead of
    committing in between.
    """
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        raise TransactionManagementError("lock_store_files() needs a transaction to last")
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            function = "pg_advisory_xact_lock" if indexing else "pg_advisory_xact_lock_shared"
            cursor.execute(f"SELECT {function}(%s)", [_FILES_LOCK_KEY])
        elif connection.vendor == "sqlite":
            table = connection.ops.quote_name(PendingFileDeletion._meta.db_table)
            cursor.execute(f"UPDATE {table} SET id = id WHERE 0")  # noqa: S608 - a model's table


def delete_message(message: Message, *, user) -> int:
    """Delete a message for `user`: their own recipients, or all of it for vadmin.

    Returns the number of messages whose file was removed."""
    recipients = Recipient.objects.filter(message=message).visible_to(user)
    _, removed = _delete_recipients(recipients)
    record_event(user, AuditEvent.Action.DELETE, mail_id=message.mail_id)
    return removed


def delete_copies(message: Message, owner, *, user) -> tuple[list[str], bool]:
    """Delete `owner`'s recipients of `message` (vadmin acting on one user's list), and the
    message with its file once no recipient is left. Returns the addresses deleted and
    whether the message went; `user` is recorded as the one who did it."""
    owned = Address.objects.for_user(owner).values("address")
    copies = Recipient.objects.filter(message=message, address__in=owned)
    with transaction.atomic():
        lock_store_files()
        addresses = sorted(copies.values_list("address", flat=True))
        if not addresses:
            return [], False
        _, removed = _delete_recipients(copies)
    record_event(user, AuditEvent.Action.DELETE, mail_id=message.mail_id,
                 detail=f"{owner.get_username()}'s copies: {', '.join(addresses)}")
    return addresses, removed > 0


def delete_for_addresses(
    addresses: Iterable[str], *, user, up_to: int | None = None
) -> int:
    """Delete every message held for these addresses (a user's "Delete all"); with `up_to`,
    only recipients up to that id (what the confirmation page counted: mail that came
    after it stays). Returns the number of the user's messages deleted (one per message,
    however many of the addresses it was sent to)."""
    recipients = Recipient.objects.filter(address__in=list(addresses))
    if up_to is not None:
        recipients = recipients.filter(id__lte=up_to)
    count, _ = _delete_recipients(recipients)
    record_event(
        user, AuditEvent.Action.CLEAR, detail=f"{count} messages of the user's addresses"
    )
    return count


def clear_quarantine(*, user) -> int:
    """Delete the whole quarantine (vadmin): every message, and the held files of the store
    that are not indexed yet.

    The store is listed before the rows are read, and files younger than a few minutes
    are left out: a file the filter stores meanwhile is either indexed by then (its row
    and file go) or kept as mail that came after the clear.
    """
    store = get_store()
    held = _held_keys(store)
    origins = {str(store.root), str(store.root.absolute()), str(store.root.resolve())}
    with transaction.atomic():
        # Before the rows are read: an index batch that found one of the held files commits
        # its row first (and the row goes with the others), or sees the pending record.
        lock_store_files()
        indexed = set(
            Message.objects.filter(origin__in=origins).values_list("storage_key", flat=True)
        )
        unindexed = [(str(store.root), key) for key in held if key not in indexed]
        removed = _delete_messages(Message.objects.all(), also_files=unindexed)
    record_event(user, AuditEvent.Action.CLEAR, detail=f"whole quarantine, {removed} messages")
    return removed


def discard_file(store: FileStore, key: str) -> None:
    """Remove a file the filter wrote but does not keep (its insert failed, or the worker
    gave the write up): the client is told to send the message again, so nothing of this
    copy may stay.

    The file goes first, so that it goes even without the database. An index run may have
    found it before: under the lock, a batch that checked the file before it went has
    committed its row by then (and the row goes too), and a later one finds it gone.

    Raises StoreError when the file cannot be removed: a pending deletion record keeps
    index runs from taking it, and `prunequarantine` removes it later."""
    origins = {str(store.root), str(store.root.absolute()), str(store.root.resolve())}
    rows = Message.objects.filter(origin__in=origins, storage_key=key)
    try:
        store.delete(key)
    except StoreError:
        try:
            _delete_messages(rows, also_files=[(str(store.root), key)])
        except DatabaseError as exc:
            log.warning("%s: no pending deletion recorded (%s)", store.path(key), exc)
        raise
    try:
        with transaction.atomic():
            lock_store_files()
            rows.delete()
    except DatabaseError as exc:
        # The database that failed the insert: no index run commits a row meanwhile.
        log.debug("rows of %s not checked: %s", store.path(key), exc)


def delete_messages(
    messages,
    *,
    user=None,
    action: str = AuditEvent.Action.DELETE,
    errors: list[str] | None = None,
) -> int:
    """Delete whole messages (rows and files); used by retention. Outside a transaction the
    files are unlinked before this returns, and each one that cannot be is named in
    `errors`."""
    return _delete_messages(messages, errors=errors)


def _delete_recipients(recipients) -> tuple[int, int]:
    """Delete recipient rows, and each of their messages left with no recipient. Returns
    (messages the rows belonged to, files removed).

    The messages are locked first (in id order): two users deleting their copies of one
    message at the same time then take turns, and the second sees the first's deletion,
    so the message goes with its last recipient rather than staying with none."""
    with transaction.atomic():
        lock_store_files()
        message_ids = sorted(set(recipients.values_list("message_id", flat=True)))
        locked: list[int] = []
        for start in range(0, len(message_ids), BATCH_SIZE):
            locked += Message.objects.select_for_update().filter(
                id__in=message_ids[start : start + BATCH_SIZE]
            ).order_by("id").values_list("id", flat=True)
        recipients.delete()
        orphans = Message.objects.filter(id__in=locked, recipients__isnull=True)
        return len(message_ids), _delete_messages(orphans)


def _delete_messages(
    messages,
    *,
    also_files: Iterable[tuple[str, str]] = (),
    errors: list[str] | None = None,
) -> int:
    """Delete the messages' rows, and after the commit their files and `also_files` (files
    without a row). Returns the number of files.

    The rows are read once: the rows deleted are exactly those whose files are recorded,
    whatever commits meanwhile."""
    with transaction.atomic():
        lock_store_files()
        rows = list(messages.values_list("id", "origin", "storage_key"))
        files = [(origin, key) for _, origin, key in rows] + list(also_files)
        ids = [row_id for row_id, _, _ in rows]
        for start in range(0, len(ids), BATCH_SIZE):
            Message.objects.filter(id__in=ids[start : start + BATCH_SIZE]).delete()
        PendingFileDeletion.objects.bulk_create(
            [PendingFileDeletion(origin=origin, storage_key=key) for origin, key in files],
            batch_size=BATCH_SIZE,
            ignore_conflicts=True,
        )
        transaction.on_commit(lambda: _remove_files(files, errors))
    return len(files)


def _remove_files(files: list[tuple[str, str]], errors: list[str] | None = None) -> int:
    """Unlink files whose rows are deleted; each one's PendingFileDeletion goes once it is
    unlinked or found gone, and stays (for `prunequarantine`) when the unlink fails (and
    the failure is added to `errors`). Returns the number of files that are gone now."""
    gone = 0
    for start in range(0, len(files), BATCH_SIZE):
        done: dict[str, list[str]] = {}
        for origin, key in files[start : start + BATCH_SIZE]:
            try:
                get_store(origin).delete(key)
            except StoreError as exc:
                log.warning("%s", exc)
                if errors is not None:
                    errors.append(str(exc))
            else:
                done.setdefault(origin, []).append(key)
        for origin, keys in done.items():
            try:
                PendingFileDeletion.objects.filter(origin=origin, storage_key__in=keys).delete()
            except DatabaseError as exc:
                # The files are gone; the records stay for prunequarantine, which finds
                # them gone. The deletion itself is committed: no error for the caller.
                log.warning("cannot drop pending deletion records: %s", exc)
            gone += len(keys)
    return gone


def retry_pending_deletions(errors: list[str] | None = None) -> int:
    """Unlink the files that an interrupted or failed removal left; returns how many are
    gone now (a file whose unlink fails again keeps its record for the next run, and is
    named in `errors`)."""
    gone = 0
    last_id = 0
    while True:
        rows = list(
            PendingFileDeletion.objects.filter(id__gt=last_id)
            .order_by("id")
            .values_list("id", "origin", "storage_key")[:BATCH_SIZE]
        )
        if not rows:
            return gone
        last_id = rows[-1][0]
        gone += _remove_files([(origin, key) for _, origin, key in rows], errors)


def _held_keys(store: FileStore) -> list[str]:
    """Keys of the store's files named as held mail (virus, banned, spam, bad header);
    temporary files and other quarantine kinds are left alone. An unlistable store gives
    none: its files are not touched."""
    if not store.root.is_dir():
        return []
    # A file the filter is storing right now (renamed into place, its row not yet
    # committed) is young: left alone, as mail that came after the clear.
    settled = time.time() - _YOUNG_SECONDS
    try:
        return [
            key
            for key, st in store.iter_files()
            if name_info(key.rsplit("/", 1)[-1])[0] is not None and st.st_mtime < settled
        ]
    except StoreError as exc:
        log.warning("%s", exc)
        return []
