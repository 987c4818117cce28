"""Celery twins of the directory commands: thin, JSON arguments, a summary string back."""

from __future__ import annotations

import logging

from celery import shared_task
from django.db import IntegrityError

from directory.ldap import DirectoryError
from directory.relaymap import RelayMapError
from directory.sync import SyncBusy, sync_directory

log = logging.getLogger(__name__)


@shared_task(serializer="json")
def sync_directory_task(clear: bool = False) -> str:
    """The periodic sync (beat entry "sync-directory"). The bind password is read from
    settings by the worker, never carried in the task message.

    A sync already running (a retry overlapping the schedule) makes this one a no-op:
    the lock inside sync_directory decides."""
    try:
        return str(sync_directory(clear=clear))
    except SyncBusy as exc:
        log.info("directory sync skipped: %s", exc)
        return f"skipped: {exc}"
    except (DirectoryError, RelayMapError, IntegrityError) as exc:
        # Nothing changed (an IntegrityError is a clash with a concurrent writer that the
        # sync could not settle: its transaction was rolled back); say so loudly in the
        # worker's log and in the result.
        log.error("directory sync failed, nothing changed: %s", exc)
        return f"failed, nothing changed: {exc}"
