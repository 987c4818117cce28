"""A directory sync that fails must be a failed Celery job, seen as such by whoever watches
the workers (Flower, `celery inspect`, the result backend, the task_failure signal), and
must leave the relay map as it was. A sync skipped because another one runs is no failure.

The jobs run on a real worker on the real Redis broker (tests/directory/test_sync_task.py,
project_worker) against a real slapd that is stopped in the middle of the test.
"""

from __future__ import annotations

import fcntl
import os
import shutil

import pytest
from django.contrib.auth.models import User

from directory.models import Address
from directory.tasks import DirectorySyncFailed
from tests.directory.conftest import addresses_of, map_keys, unsupported_postmap_type
from tests.directory.slapd import person, start_slapd
from tests.directory.test_sync_task import TASK, job_signals, left_in_broker, project_worker

pytestmark = [pytest.mark.slapd, pytest.mark.django_db(transaction=True)]


def _map_state(path) -> list[tuple[str, bytes, int, int]]:
    """The relay map's text and postmap database: content, inode and mtime of each, so that
    a map rewritten with the same content still counts as touched."""
    state = []
    for file in (path, path.with_name(path.name + ".db")):
        st = file.stat()
        state.append((file.name, file.read_bytes(), st.st_ino, st.st_mtime_ns))
    return state


def test_a_sync_against_a_stopped_directory_is_a_failed_job_and_keeps_the_relay_map(
        settings, directory, tmp_path):
    """The nightly sync runs once; then the directory server stops. The next run must end in
    state FAILURE with a message naming the server, the task_failure signal must fire,
    the message must be acknowledged (not delivered again and again: acks_late is on), and
    users, addresses and the relay map must stay as the last good sync left them."""
    (tmp_path / "slapd").mkdir()
    server = start_slapd(tmp_path / "slapd")
    try:
        ou = server.new_ou()
        for name in ("Alice", "Bob", "Carol"):
            server.add(f"cn={name},{ou}", person(name, mail=f"{name.lower()}@example.test"))
        settings.LDAP_SERVER = server.ldaps_url
        # Stopping the server removes its directory, CA included: keep a copy.
        ca_file = tmp_path / "ca.pem"
        shutil.copyfile(server.ca_file, ca_file)
        settings.LDAP_CA_FILE = str(ca_file)
        settings.LDAP_BASE_DN = [ou]
        with (job_signals() as (started, failures),
              project_worker("spamviewer-sync-failure-test") as (app, queue)):
            good = app.tasks[TASK].apply_async(queue=queue).get(timeout=60)
            before = _map_state(settings.RELAY_MAP_PATH)
            server.stop()
            failed = app.tasks[TASK].apply_async(queue=queue)
            with pytest.raises(DirectorySyncFailed) as raised:
                failed.get(timeout=60)
    finally:
        server.stop()

    assert good.startswith("3 directory objects; users added 3"), good
    assert failed.state == "FAILURE"
    message = str(failed.result)
    assert message == str(raised.value)
    assert message.startswith(f"directory sync failed, nothing changed: {server.ldaps_url}")
    assert [(task_id, str(exc)) for task_id, exc in failures] == [(failed.id, message)]
    assert started.count(failed.id) == 1
    assert left_in_broker(queue, failed.id) == []
    # Nothing changed: the relay map is the one the good run wrote, users stay active.
    assert _map_state(settings.RELAY_MAP_PATH) == before
    assert map_keys(settings) == ["alice@example.test", "bob@example.test",
                                  "carol@example.test"]
    assert sorted(User.objects.filter(is_active=True).values_list("username", flat=True)) == [
        "alice@example.test", "bob@example.test", "carol@example.test"]
    assert Address.objects.count() == 3


def test_a_sync_skipped_because_another_runs_is_a_successful_job(settings, directory):
    """A run that finds another sync holding the lock (a manual `syncdirectory` while beat's
    run starts) did what it should: nothing. It succeeds, saying it skipped."""
    directory.person("Alice", mail="alice@example.test")
    with (job_signals() as (started, failures),
          project_worker("spamviewer-sync-skipped-test") as (app, queue)):
        with open(settings.DIRECTORY_SYNC_LOCK, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            skipped = app.tasks[TASK].apply_async(queue=queue)
            summary = skipped.get(timeout=60)

    assert skipped.state == "SUCCESS"
    assert summary == "skipped: another directory sync is running"
    assert failures == [] and started.count(skipped.id) == 1
    assert not User.objects.exists() and not settings.RELAY_MAP_PATH.exists()


def test_a_sync_whose_relay_map_cannot_be_written_is_a_failed_job_that_changes_nothing(
        settings, directory):
    """postmap fails (here: a map type this Postfix lacks): the map is not replaced and the
    database is rolled back, so the job fails saying nothing changed, and a person
    deleted from the directory meanwhile keeps their user and addresses."""
    for name in ("Alice", "Bob", "Carol"):
        directory.person(name, mail=f"{name.lower()}@example.test")
    dave = directory.slapd.add(f"cn=Dave,{directory.dn}",
                              person("Dave", mail="dave@example.test"))
    with (job_signals() as (started, failures),
          project_worker("spamviewer-sync-postmap-test") as (app, queue)):
        app.tasks[TASK].apply_async(queue=queue).get(timeout=60)
        before = _map_state(settings.RELAY_MAP_PATH)
        directory.slapd.delete(dave)
        settings.RELAY_MAP_POSTMAP = map_type = unsupported_postmap_type()
        failed = app.tasks[TASK].apply_async(queue=queue)
        with pytest.raises(DirectorySyncFailed,
                           match="^directory sync failed, nothing changed: "):
            failed.get(timeout=60)

    assert failed.state == "FAILURE"
    assert map_type in str(failed.result)
    assert [task_id for task_id, _ in failures] == [failed.id]
    assert started.count(failed.id) == 1 and left_in_broker(queue, failed.id) == []
    assert _map_state(settings.RELAY_MAP_PATH) == before
    assert not os.path.exists(f"{settings.RELAY_MAP_PATH}.{map_type}")
    assert User.objects.get(username="dave@example.test").is_active
    assert addresses_of("dave@example.test") == {"dave@example.test"}
