"""Celery twins of the directory commands: thin, JSON arguments, a summary string back.

A sync that fails raises, so that the job ends in state FAILURE where whoever watches the
workers looks (Flower, `celery inspect`, task_failure, a result backend). Jobs are
acknowledged late (settings), and Celery acknowledges a job that raised
(task_acks_on_failure_or_timeout), so a failed sync is not delivered again: the next one is
beat's next run.
"""

from __future__ import annotations

import logging

from celery import shared_task
from django.db import IntegrityError

from directory.ldap import DirectoryError
from directory.relaymap import RelayMapError
from directory.sync import SyncBusy, sync_directory

log = logging.getLogger(__name__)


class DirectorySyncFailed(Exception):
    """The sync could not be done and changed nothing. One string argument, so that the
    exception travels through a JSON result backend and comes back as itself."""


@shared_task(serializer="json")
def sync_directory_task(clear: bool = False) -> str:
    """The periodic sync (beat entry "sync-directory"). The bind password is read from
    settings by the worker, never carried in the task message.

    A sync already running (a retry overlapping the schedule) makes this one a no-op, and
    a successful one: the lock inside sync_directory decides."""
    try:
        return str(sync_directory(clear=clear))
    except SyncBusy as exc:
        log.info("directory sync skipped: %s", exc)
        return f"skipped: {exc}"
    except (DirectoryError, RelayMapError, IntegrityError) as exc:
        # Nothing changed (an IntegrityError is a clash with a concurrent writer that the
        # sync could not settle: its transaction was rolled back). The worker logs the
        # failure with its trace.
        raise DirectorySyncFailed(f"directory sync failed, nothing changed: {exc}") from exc
