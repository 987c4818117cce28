"""The Celery application.

The broker is Redis in production (REDIS_URL). Under `manage.py runsystem` without Redis it
is kombu's filesystem transport in var/celery/ (EMBEDDED_BROKER); with neither, tasks run
in-process (CELERY_TASK_ALWAYS_EAGER). See the Celery section of settings.
"""

import os
from pathlib import Path

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "spamviewer.settings")

app = Celery("spamviewer")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def embedded_broker_folders() -> list[Path]:
    """The folders of the filesystem transport; empty unless EMBEDDED_BROKER is on."""
    from django.conf import settings

    if not settings.EMBEDDED_BROKER:
        return []
    options = settings.CELERY_BROKER_TRANSPORT_OPTIONS
    names = ("data_folder_in", "data_folder_out", "control_folder", "processed_folder")
    return sorted({Path(options[name]) for name in names})


@app.on_after_configure.connect
def _make_embedded_broker_folders(sender, **kwargs) -> None:
    # The transport writes into these folders but never creates them.
    for folder in embedded_broker_folders():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
