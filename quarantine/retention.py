"""Retention: keep the quarantine within its age and size limits.

Messages older than QUARANTINE_MAX_AGE_DAYS go first; then, while the files of what is
left add up to more than QUARANTINE_MAX_SIZE_MB, the oldest go. Rows and files are deleted
together through quarantine.deletion, a batch of messages per transaction, so that a
million expired messages never mean a million queries or one huge transaction. Each run
also removes the files of deleted messages that a crash or a failed unlink left on disk
(their PendingFileDeletion records).

A file that cannot be removed (a read-only or failing disk) does not stop the run: it keeps
its record for the next run and is named in the summary's `errors`, since the space it
holds is not freed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Sum
from django.utils import timezone

from quarantine.deletion import delete_messages, retry_pending_deletions
from quarantine.models import AuditEvent, Message, record_event
from quarantine.store import get_store

log = logging.getLogger(__name__)

BATCH_SIZE = 1000


@dataclass
class PruneSummary:
    expired: int = 0
    over_size: int = 0
    temporary_files: int = 0
    pending_files: int = 0
    max_age_days: int = 0
    max_size_mb: int = 0
    # Files that could not be removed, and why; one line each.
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        age = f"older than {self.max_age_days} days" if self.max_age_days else "no age limit"
        size = f"over {self.max_size_mb} MB" if self.max_size_mb else "no size limit"
        text = (
            f"pruned {self.expired} messages ({age}), {self.over_size} messages ({size}), "
            f"{self.temporary_files} temporary files"
        )
        if self.pending_files:
            text += f", {self.pending_files} left-over files of deleted messages"
        if self.errors:
            text += f"; {len(self.errors)} files could not be removed"
        return text


def prune_quarantine(
    *,
    now: datetime | None = None,
    max_age_days: int | None = None,
    max_size_mb: int | None = None,
) -> PruneSummary:
    """Delete what is beyond the age and size limits (0 = no limit); settings by default."""
    now = now or timezone.now()
    if max_age_days is None:
        max_age_days = settings.QUARANTINE_MAX_AGE_DAYS
    if max_size_mb is None:
        max_size_mb = settings.QUARANTINE_MAX_SIZE_MB
    summary = PruneSummary(max_age_days=max_age_days, max_size_mb=max_size_mb)

    # Files of messages deleted earlier whose removal was interrupted or failed.
    summary.pending_files = retry_pending_deletions(summary.errors)

    if max_age_days > 0:
        cutoff = now - timedelta(days=max_age_days)
        summary.expired = _delete_oldest(
            Message.objects.filter(received_at__lt=cutoff), errors=summary.errors
        )
    if max_size_mb > 0:
        summary.over_size = _delete_oldest(
            Message.objects.all(), down_to_bytes=max_size_mb * 1024 * 1024,
            errors=summary.errors,
        )

    store = get_store()
    if store.root.is_dir():
        try:
            summary.temporary_files = store.cleanup_temporary()
        except OSError as exc:
            log.warning("%s: cannot remove temporary files (%s)", store.root, exc)
            summary.errors.append(f"{store.root}: cannot remove temporary files ({exc})")

    if summary.expired or summary.over_size or summary.temporary_files or summary.pending_files:
        record_event(None, AuditEvent.Action.PRUNE, detail=str(summary))
    return summary


def _total_size() -> int:
    return Message.objects.aggregate(total=Sum("file_size"))["total"] or 0


def _delete_oldest(
    messages, *, down_to_bytes: int | None = None, errors: list[str] | None = None
) -> int:
    """Delete messages oldest first, a batch per transaction.

    With `down_to_bytes`, stop once the whole quarantine is no larger than that. The size
    is read again before each batch, so that rows deleted meanwhile (by a user, or by
    another run of this at the same time) count: two runs never delete more between them
    than one would. Each batch is read afresh: rows deleted meanwhile are not found.
    """
    deleted = 0
    while True:
        excess = None
        if down_to_bytes is not None:
            excess = _total_size() - down_to_bytes
            if excess <= 0:
                break
        rows = list(
            messages.order_by("received_at", "id").values_list("id", "file_size")[:BATCH_SIZE]
        )
        if not rows:
            break
        if excess is not None:
            take, freed = [], 0
            for row_id, size in rows:
                take.append(row_id)
                freed += size
                if freed >= excess:
                    break
        else:
            take = [row_id for row_id, _ in rows]
        count = delete_messages(
            Message.objects.filter(id__in=take), action=AuditEvent.Action.PRUNE, errors=errors
        )
        deleted += count
        if count == 0 and excess is None:
            break
    return deleted
