"""The Celery application. Tasks run on Redis in production; with no broker configured
they run in-process (see CELERY_TASK_ALWAYS_EAGER in settings)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "spamviewer.settings")

app = Celery("spamviewer")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
