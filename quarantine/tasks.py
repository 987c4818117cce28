"""Celery tasks of the quarantine: thin callers of the workflow functions.

Arguments are JSON (directory strings); each task returns a summary string. With no broker
configured the tasks run in-process (CELERY_TASK_ALWAYS_EAGER).

A job that could not do its work raises once it has done what it could, so that it ends in
state FAILURE where whoever watches the workers looks (Flower, `celery inspect`,
task_failure, a result backend). Jobs are acknowledged late (settings), and Celery
acknowledges a job that raised (task_acks_on_failure_or_timeout), so a failed job is not
delivered again: the next one is the next scheduled run.
"""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from quarantine.indexer import index_directory
from quarantine.retention import prune_quarantine
from quarantine.store import StoreError

log = logging.getLogger(__name__)

# Failures named one by one in a job's error; the rest are counted.
MAX_NAMED_ERRORS = 20


class IndexFailed(Exception):
    """Directories that could not be indexed (the others were). One string argument, so
    that the exception travels through a JSON result backend and comes back as itself."""


class PruneFailed(Exception):
    """Files that retention could not remove (the rest of the run was done)."""


@shared_task(name="quarantine.tasks.index_quarantine_task")
def index_quarantine_task(dirs: list[str] | None = None) -> str:
    """Index each directory (QUARANTINE_DIR when none is given); one summary line each.

    A directory that cannot be read does not keep the others from being indexed; the job
    fails afterwards, naming each one that could not be."""
    directories = dirs or [str(settings.QUARANTINE_DIR)]
    lines: list[str] = []
    failed: list[str] = []
    for directory in directories:
        try:
            summary = index_directory(directory)
        except StoreError as exc:
            failed.append(str(exc))
        else:
            log.info("%s", summary)
            lines.append(str(summary))
    if failed:
        raise IndexFailed(
            f"{len(failed)} of {len(directories)} quarantine directories not indexed: "
            + _named(failed)
        )
    return "\n".join(lines)


@shared_task(name="quarantine.tasks.prune_quarantine_task")
def prune_quarantine_task() -> str:
    """Apply retention. A run that could not remove files (their space is not freed) fails
    after the rest of its work, naming them; they are tried again at the next run."""
    summary = prune_quarantine()
    if summary.errors:
        raise PruneFailed(f"{summary}: {_named(summary.errors)}")
    return str(summary)


def _named(errors: list[str]) -> str:
    text = "; ".join(errors[:MAX_NAMED_ERRORS])
    if len(errors) > MAX_NAMED_ERRORS:
        text += f"; and {len(errors) - MAX_NAMED_ERRORS} more"
    return text
