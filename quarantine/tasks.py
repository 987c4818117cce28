"""Celery tasks of the quarantine: thin callers of the workflow functions.

Arguments are JSON (directory strings); each task returns a summary string. With no broker
configured the tasks run in-process (CELERY_TASK_ALWAYS_EAGER).
"""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from quarantine.indexer import index_directory
from quarantine.retention import prune_quarantine
from quarantine.store import StoreError

log = logging.getLogger(__name__)


@shared_task(name="quarantine.tasks.index_quarantine_task")
def index_quarantine_task(dirs: list[str] | None = None) -> str:
    """Index each directory (QUARANTINE_DIR when none is given); one summary line each."""
    lines = []
    for directory in dirs or [str(settings.QUARANTINE_DIR)]:
        try:
            lines.append(str(index_directory(directory)))
        except StoreError as exc:
            log.error("%s", exc)
            lines.append(f"not indexed: {exc}")
    return "\n".join(lines)


@shared_task(name="quarantine.tasks.prune_quarantine_task")
def prune_quarantine_task() -> str:
    return str(prune_quarantine())
