"""Deleting quarantined mail: one recipient's copy, a user's mail, or the whole quarantine.

A message is shared by its recipients: deleting it for one user removes that user's
recipient rows; the message row and its file go once no recipient is left. Rows go first
(in a transaction) and files after the commit, so a crash leaves at worst an orphan file
that `prunequarantine` removes, never a row that points at nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from django.db import transaction

from quarantine.models import AuditEvent, Message, Recipient, record_event
from quarantine.store import StoreError, get_store

log = logging.getLogger(__name__)


def delete_message(message: Message, *, user) -> int:
    """Delete a message for `user`: their own recipients, or all of it for vadmin.

    Returns the number of messages whose file was removed."""
    recipients = Recipient.objects.filter(message=message).visible_to(user)
    removed = _delete_recipients(recipients, user=user)
    record_event(user, AuditEvent.Action.DELETE, mail_id=message.mail_id)
    return removed


def delete_for_addresses(addresses: Iterable[str], *, user) -> int:
    """Delete every message held for these addresses (a user's "Delete all")."""
    recipients = Recipient.objects.filter(address__in=list(addresses))
    removed = _delete_recipients(recipients, user=user)
    record_event(
        user, AuditEvent.Action.CLEAR, detail=f"{removed} messages of the user's addresses"
    )
    return removed


def clear_quarantine(*, user) -> int:
    """Delete the whole quarantine (vadmin)."""
    removed = _delete_messages(Message.objects.all())
    record_event(user, AuditEvent.Action.CLEAR, detail=f"whole quarantine, {removed} messages")
    return removed


def delete_messages(messages, *, user=None, action: str = AuditEvent.Action.DELETE) -> int:
    """Delete whole messages (rows and files); used by retention."""
    return _delete_messages(messages)


def _delete_recipients(recipients, *, user) -> int:
    with transaction.atomic():
        message_ids = set(recipients.values_list("message_id", flat=True))
        recipients.delete()
        orphans = Message.objects.filter(id__in=message_ids, recipients__isnull=True)
        return _delete_messages(orphans)


def _delete_messages(messages) -> int:
    with transaction.atomic():
        files = list(messages.values_list("origin", "storage_key"))
        Message.objects.filter(id__in=messages.values("id")).delete()
        transaction.on_commit(lambda: _remove_files(files))
    return len(files)


def _remove_files(files: list[tuple[str, str]]) -> None:
    for origin, key in files:
        try:
            get_store(origin).delete(key)
        except StoreError as exc:
            log.warning("%s", exc)
