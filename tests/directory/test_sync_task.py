"""The periodic directory sync as a Celery task, once through a real worker on Redis."""

from __future__ import annotations

import fcntl
import json
import uuid

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.schedules import crontab
from celery.signals import before_task_publish
from django.conf import settings as django_settings
from django.contrib.auth.models import User

from directory.tasks import sync_directory_task

pytestmark = pytest.mark.slapd

REDIS = "redis://127.0.0.1:6379/0"
TASK = "directory.tasks.sync_directory_task"


def test_the_beat_schedule_runs_the_sync_at_the_configured_time():
    entry = django_settings.CELERY_BEAT_SCHEDULE["sync-directory"]
    assert entry["task"] == TASK
    assert entry["schedule"] == crontab(minute="30", hour="2")


@pytest.mark.django_db
def test_the_task_skips_while_another_sync_holds_the_lock(settings, directory):
    directory.person("Alice", mail="alice@example.test")
    with open(settings.DIRECTORY_SYNC_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert sync_directory_task() == "skipped: another directory sync is running"
    assert not User.objects.exists()


@pytest.mark.django_db
def test_the_task_reports_an_unreachable_directory_and_changes_nothing(settings, directory):
    settings.LDAP_SERVER = "ldaps://127.0.0.1:1"
    assert sync_directory_task().startswith("failed, nothing changed: ldaps://127.0.0.1:1")


@pytest.mark.django_db(transaction=True)
def test_the_sync_task_runs_on_a_real_worker_with_json_messages(settings, directory):
    directory.person("Alice", mail="alice@example.test", proxy=["SMTP:alice@example.test",
                                                                 "smtp:ali@example.test"])
    queue = f"spamviewer-test-{uuid.uuid4().hex}"
    app = Celery("spamviewer-directory-test", broker=REDIS, backend=REDIS,
                 set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json",
                    accept_content=["json"], task_default_queue=queue,
                    broker_connection_retry_on_startup=False)
    sent: list = []

    def record(sender=None, body=None, headers=None, **kwargs) -> None:
        sent.append({"body": body, "headers": headers})

    before_task_publish.connect(record, sender=TASK, weak=False)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            summary = app.tasks[TASK].apply_async(queue=queue).get(timeout=60)
    finally:
        before_task_publish.disconnect(record, sender=TASK)

    assert summary.startswith("1 directory objects; users added 1")
    assert set(User.objects.get().addresses.values_list("address", flat=True)) == {
        "alice@example.test", "ali@example.test"}
    # The message carries no directory credentials: the worker reads them from settings.
    assert len(sent) == 1
    assert settings.LDAP_BIND_PASSWORD not in json.dumps(sent, default=str)
