"""The periodic directory sync as a Celery task, once through a real worker on Redis."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from celery import Celery, _state
from celery.contrib.testing.worker import start_worker
from celery.schedules import crontab
from celery.signals import before_task_publish, task_failure, task_prerun
from django.contrib.auth.models import User

from directory.tasks import DirectorySyncFailed, sync_directory_task

pytestmark = pytest.mark.slapd

ROOT = Path(__file__).resolve().parents[2]
REDIS = "redis://127.0.0.1:6379/0"
TASK = "directory.tasks.sync_directory_task"


@contextmanager
def project_worker(name: str) -> Iterator[tuple[Celery, str]]:
    """A real worker (solo pool, in a thread of this process) of an app configured from the
    project's Celery settings (acknowledgement, limits, serializers), on the real Redis
    broker with Redis as result backend, consuming a queue of its own. Yields the app and
    that queue; send with `app.tasks[name].apply_async(queue=queue)`.

    The worker makes its app the current and default one; the project's app (tasks run
    in-process, as without a broker) is both again afterwards."""
    queue = f"spamviewer-test-{uuid.uuid4().hex}"
    app = Celery(name, set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.update(broker_url=REDIS, result_backend=REDIS, task_always_eager=False,
                    task_default_queue=queue, broker_connection_retry_on_startup=False)
    current, default = _state.get_current_app(), _state.default_app
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            yield app, queue
    finally:
        current.set_current()
        _state.set_default_app(default)


@contextmanager
def job_signals() -> Iterator[tuple[list[str], list[tuple[str, BaseException]]]]:
    """The ids of the tasks a worker started (task_prerun) and the failures it reported
    (task_failure, what monitoring hooks into), while the block runs."""
    started: list[str] = []
    failures: list[tuple[str, BaseException]] = []

    def on_prerun(task_id=None, **kwargs) -> None:
        started.append(task_id)

    def on_failure(task_id=None, exception=None, **kwargs) -> None:
        failures.append((task_id, exception))

    task_prerun.connect(on_prerun, weak=False)
    task_failure.connect(on_failure, weak=False)
    try:
        yield started, failures
    finally:
        task_prerun.disconnect(on_prerun)
        task_failure.disconnect(on_failure)


def left_in_broker(queue: str, task_id: str) -> list[bytes]:
    """What Redis still holds of one task's message once the worker stopped: queued again
    (a worker restores what it did not acknowledge) or still unacknowledged."""
    client = redis.Redis.from_url(REDIS)
    try:
        queued = [m for key in client.keys(f"{queue}*") for m in client.lrange(key, 0, -1)]
        unacked = [m for m in client.hvals("unacked") if task_id.encode() in m]
    finally:
        client.close()
    return queued + unacked


def test_the_beat_schedule_runs_the_sync_at_the_configured_time(tmp_path):
    """With a directory configured (settings read afresh, as a beat process reads them),
    beat runs the sync at DIRECTORY_SYNC_CRON's default time."""
    env = {"PATH": "/usr/bin:/bin", "SPAMVIEWER_VAR_DIR": str(tmp_path),
           "SPAMVIEWER_IGNORE_DOTENV": "1", "LDAP_SERVER": "ldaps://dc1.example.test",
           "DJANGO_SETTINGS_MODULE": "spamviewer.settings"}
    code = ("import django; django.setup(); from django.conf import settings; "
            "entry = settings.CELERY_BEAT_SCHEDULE['sync-directory']; "
            "print(entry['task']); print(repr(entry['schedule']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [TASK, repr(crontab(minute="30", hour="2"))]


@pytest.mark.django_db
def test_the_task_skips_while_another_sync_holds_the_lock(settings, directory):
    directory.person("Alice", mail="alice@example.test")
    with open(settings.DIRECTORY_SYNC_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert sync_directory_task() == "skipped: another directory sync is running"
    assert not User.objects.exists()


@pytest.mark.django_db
def test_the_task_fails_on_an_unreachable_directory_and_changes_nothing(settings, directory):
    settings.LDAP_SERVER = "ldaps://127.0.0.1:1"
    with pytest.raises(DirectorySyncFailed,
                       match="^directory sync failed, nothing changed: ldaps://127.0.0.1:1"):
        sync_directory_task()
    assert not User.objects.exists()
    assert not settings.RELAY_MAP_PATH.exists()


@pytest.mark.django_db(transaction=True)
def test_the_sync_task_runs_on_a_real_worker_with_json_messages(settings, directory):
    directory.person("Alice", mail="alice@example.test", proxy=["SMTP:alice@example.test",
                                                                 "smtp:ali@example.test"])
    sent: list = []

    def record(sender=None, body=None, headers=None, **kwargs) -> None:
        sent.append({"body": body, "headers": headers})

    before_task_publish.connect(record, sender=TASK, weak=False)
    try:
        with project_worker("spamviewer-directory-test") as (app, queue):
            summary = app.tasks[TASK].apply_async(queue=queue).get(timeout=60)
    finally:
        before_task_publish.disconnect(record, sender=TASK)

    assert summary.startswith("1 directory objects; users added 1")
    assert set(User.objects.get().addresses.values_list("address", flat=True)) == {
        "alice@example.test", "ali@example.test"}
    # The message carries no directory credentials: the worker reads them from settings.
    assert len(sent) == 1
    assert settings.LDAP_BIND_PASSWORD not in json.dumps(sent, default=str)
