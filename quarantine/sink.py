"""The quarantine sink the filter worker writes to: a file in the store plus its index rows.

`write` returns only when the file is fsynced and renamed into place *and* its rows are
committed, so that the worker's 250 (discard) or 5xx (bounce) never precedes a durable
copy. Any failure raises, and the worker answers 451: the sending MTA keeps the message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from django.db import connections

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
        return await asyncio.to_thread(
            self._write,
            category=category,
            message=message,
            sender=sender,
            recipients=list(recipients),
            reasons=list(reasons),
            headers=list(headers),
        )

    def _write(
        self, *, category: str, message: bytes, sender: str, recipients: list[str],
        reasons: list[str], headers: list[tuple[str, str]] | None = None,
    ) -> str:
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
            index_file(self.store, key)
        except Exception:
            # Without its row the file would be invisible; the client retries anyway.
            try:
                self.store.delete(key)
            except StoreError:
                log.exception("cannot remove unindexed quarantine file %s", key)
            raise
        finally:
            # The executor's threads come and go with the event loop: a connection left
            # open here would outlive its thread. One connection per quarantined message
            # is cheap next to the fsyncs above.
            connections.close_all()
        return mail_id
