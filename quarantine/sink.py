"""The quarantine sink the filter worker writes to: a file in the store plus its index rows.

`write` returns only when the file is fsynced and renamed into place *and* its rows are
committed, so that the worker's 250 (discard) or 5xx (bounce) never precedes a durable
copy. Any failure raises, and the worker answers 451: the sending MTA keeps the message.

A write the worker stops waiting for (its time limit, a stalled disk or a locked table) is
given up: its database statement is cancelled, nothing is committed and its file is
removed, so that the copy the client sends again is the only one. Only a commit already on
its way in that instant can still complete; the retried message is then a duplicate, never
a loss.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction

from quarantine.deletion import discard_file
from quarantine.indexer import index_file
from quarantine.store import (
    FileStore,
    StoreError,
    generate_mail_id,
    get_store,
    received_field,
    starts_with_received,
)

log = logging.getLogger(__name__)


def _findings(category: str, reasons: Sequence[str]) -> list[tuple[str, str]]:
    """The amavisd-new header fields that tell the viewer why a message is held, for a
    caller that gave only a category and reasons."""
    text = ", ".join(reasons) or category
    if category == "VIRUS":
        return [("X-Amavis-Alert", f"INFECTED, message contains virus: {text}")]
    if category == "BANNED":
        return [("X-Amavis-Alert", f"BANNED, message contains {text}")]
    if category == "BADH":
        return [("X-Amavis-Alert", f"BAD HEADER SECTION, {text}")]
    return [("X-Spam-Flag", "YES"), ("X-Spam-Status", f"Yes, tests=[{text}]")]


class GivenUp(Exception):
    """The worker stopped waiting for this write: nothing of it may be kept."""


class _Attempt:
    """One write, shared between the coroutine waiting for it and the thread doing it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._given_up = False
        self._connection: Any = None
        self._kept: str | None = None

    def check(self) -> None:
        with self._lock:
            if self._given_up:
                raise GivenUp("the filter stopped waiting for the quarantine copy")

    def running_on(self, raw_connection: Any) -> None:
        with self._lock:
            self._connection = raw_connection
        self.check()

    def kept(self, mail_id: str) -> None:
        with self._lock:
            self._kept = mail_id

    def give_up(self) -> str | None:
        """Called from the event loop. The mail_id if the copy is committed already;
        otherwise the thread rolls back at its next step, and a statement it waits in (a
        lock) is cancelled now."""
        with self._lock:
            if self._kept is not None:
                return self._kept
            self._given_up = True
            raw = self._connection
        for name in ("cancel_safe", "cancel", "interrupt"):  # psycopg 3.2+, older, sqlite3
            cancel = getattr(raw, name, None)
            if cancel is not None:
                # Cancelling opens a connection to the server: never on the event loop.
                threading.Thread(target=_quietly, args=(cancel,), daemon=True).start()
                break
        return None


def _quietly(call: Callable[[], object]) -> None:
    try:
        call()
    except Exception:  # noqa: BLE001 - the statement ended already, or the server is gone
        log.debug("cancelling a quarantine insert failed", exc_info=True)


def _retrieve(work: asyncio.Future) -> None:
    """The outcome of a write nobody waits for any more goes to the log."""
    if work.cancelled():
        return
    if work.exception() is not None:
        log.info("quarantine write given up: %s", work.exception())
    else:
        log.warning(
            "quarantine copy %s was committed as the filter gave up on it; the client's "
            "retry will be a second copy", work.result(),
        )


class DjangoQuarantineSink:
    """Quarantine through `FileStore.write` and `indexer.index_file`, off the event loop."""

    def __init__(self, store: FileStore | None = None) -> None:
        self.store = store or get_store()

    async def write(
        self,
        *,
        category: str,
        message: bytes,
        sender: str,
        recipients: Sequence[str],
        reasons: Sequence[str],
        headers: Sequence[tuple[str, str]] = (),
    ) -> str:
        """`headers`: the filter's X-Amavis-Alert / X-Spam-* fields (the store refuses any
        other name); without them, fields are made from `category` and `reasons`."""
        attempt = _Attempt()
        work = asyncio.ensure_future(
            asyncio.to_thread(
                self._write,
                category=category,
                message=message,
                sender=sender,
                recipients=list(recipients),
                reasons=list(reasons),
                headers=list(headers),
                attempt=attempt,
            )
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            mail_id = attempt.give_up()
            if mail_id is not None:
                # Committed just before the worker gave up: the copy is kept, so say so.
                return mail_id
            work.add_done_callback(_retrieve)
            raise

    def _write(
        self, *, category: str, message: bytes, sender: str, recipients: list[str],
        reasons: list[str], headers: list[tuple[str, str]] | None = None,
        attempt: _Attempt | None = None,
    ) -> str:
        attempt = attempt or _Attempt()
        attempt.check()
        mail_id, _ = generate_mail_id()
        if not starts_with_received(message):
            # amavisd-new's layout (spec 1.5 item 8): a Received field between the block
            # and the message (the worker gives its own; other writers get this one).
            message = received_field(mail_id) + message
        key = self.store.write(
            category=category,
            mail_id=mail_id,
            message=message,
            sender=sender,
            recipients=recipients,
            findings=headers or _findings(category, reasons),
        )
        try:
            db = connections[DEFAULT_DB_ALIAS]
            db.ensure_connection()
            attempt.running_on(db.connection)
            with transaction.atomic():
                index_file(self.store, key)
                # The last moment the rows can still be taken back.
                attempt.check()
            attempt.kept(mail_id)
        except Exception:
            # The client sends the message again: this copy goes, with any row an index
            # run made of it meanwhile. On a connection of its own, which a cancel sent
            # late for the write given up cannot reach.
            connections.close_all()
            try:
                discard_file(self.store, key)
            except StoreError:
                log.exception("cannot remove unindexed quarantine file %s", key)
            raise
        finally:
            # The executor's threads come and go with the event loop: a connection left
            # open here would outlive its thread. One connection per quarantined message
            # is cheap next to the fsyncs above.
            connections.close_all()
        return mail_id
