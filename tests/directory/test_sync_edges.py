"""Edge cases of the directory sync and the relay map writer, against the real slapd,
PostgreSQL and Debian's postmap (see tests/directory/conftest.py and slapd.py).

Rules checked here (spec: /work/shared/spec/active-directory.md, directory/sync.py):
- the relay map lists every address the directory says is deliverable (enabled people,
  shared/room/equipment mailboxes, groups, contacts, public folders) and is never emptied
  or shrunk by a failed or partial sync;
- the map's text and its postmap database never disagree;
- a sync that fails changes nothing.
"""

from __future__ import annotations

import threading
import uuid

import pytest
from django.contrib.auth.models import User

from directory import relaymap
from directory.ldap import DirectoryError
from directory.models import Address
from directory.relaymap import PostmapFailed, write_relay_map
from directory.sync import SyncBusy, sync_directory
from directory.tasks import DirectorySyncFailed, sync_directory_task
from tests.directory.conftest import (
    addresses_of,
    map_keys,
    postmap_query,
    unsupported_postmap_type,
)

pytestmark = [pytest.mark.slapd, pytest.mark.django_db]


def _staff(directory, count: int = 6) -> list[str]:
    """Some ordinary people, so that one change does not trip the shrink ratio."""
    return [directory.person(f"Staff {i}", mail=f"staff{i}@example.test")
            for i in range(count)]


# --- people the sync cannot make a viewer user of --------------------------------------


def test_a_person_recreated_in_the_directory_keeps_receiving_mail_and_gets_a_user(
        settings, directory):
    """An AD account deleted and created again (new objectGUID, same mailbox address, e.g.
    a re-hire or a recreated account) is an enabled mailbox: its address must stay in the
    relay map (spec "Who is a recipient": every enabled person's SMTP addresses), and the
    new object must end up with an active viewer user owning the address (the old user,
    whose object is gone, is retired)."""
    _staff(directory)
    old = directory.person("Alice", mail="alice@example.test",
                           proxy=["SMTP:alice@example.test", "smtp:a.smith@example.test"])
    sync_directory()
    assert "alice@example.test" in map_keys(settings)
    directory.slapd.delete(old)
    directory.person("Alice", mail="alice@example.test",
                     proxy=["SMTP:alice@example.test", "smtp:a.smith@example.test"],
                     guid=uuid.uuid4().bytes)

    sync_directory()

    assert {"alice@example.test", "a.smith@example.test"} <= set(map_keys(settings))
    owner = Address.objects.select_related("user").get(address="alice@example.test").user
    assert owner.is_active


def test_a_recreated_account_does_not_take_over_addresses_given_by_hand(settings, directory):
    """A viewer user of a vanished AD account that vadmin gave an extra address by hand is
    not taken over by a new account with the same primary address: the new holder of the
    address must not see the quarantine of what was given to the old one. The sync
    reports it, and the new account's addresses stay in the relay map."""
    _staff(directory)
    old = directory.person("Alice", mail="alice@example.test",
                           proxy=["SMTP:alice@example.test"])
    sync_directory()
    old_user = User.objects.get(username="alice@example.test")
    Address.objects.create(address="board@example.test", user=old_user,
                           source=Address.SOURCE_LOCAL)
    directory.slapd.delete(old)
    directory.person("Alice", mail="alice@example.test", proxy=["SMTP:alice@example.test"],
                     guid=uuid.uuid4().bytes)

    summary = sync_directory()

    assert summary.conflicts
    assert "alice@example.test" in map_keys(settings)
    assert Address.objects.get(address="board@example.test").user == old_user
    assert not User.objects.get(pk=old_user.pk).is_active


def test_a_person_skipped_for_a_local_name_clash_stays_in_the_relay_map(settings, directory):
    """A directory person whose primary address is the name of a local account is not
    synced into a viewer user (never adopt a local account), but the mailbox exists and is
    enabled in AD: its addresses must still be in the relay map, as the sync already does
    for addresses two objects claim ("stays in the relay map because the directory says it
    is deliverable"). Otherwise Postfix refuses mail for an existing recipient."""
    _staff(directory)
    User.objects.create_user("alice@example.test", password="local password 123")
    directory.person("Alice", mail="alice@example.test",
                     proxy=["SMTP:alice@example.test", "smtp:a.smith@example.test"])

    summary = sync_directory()

    assert any("a local user named alice@example.test exists" in c for c in summary.conflicts)
    assert {"alice@example.test", "a.smith@example.test"} <= set(map_keys(settings))


# --- a sync that fails half-way --------------------------------------------------------


def test_a_sync_whose_relay_map_write_fails_changes_nothing(settings, directory):
    """sync_directory's contract (and the Celery task's "failed, nothing changed") is that
    a failed sync leaves users and addresses as they were. When postmap fails, the map is
    kept, so the database must be rolled back too: a person deleted in AD stays active
    with their addresses until a sync succeeds."""
    _staff(directory)
    bob = directory.person("Bob", mail="bob@example.test")
    sync_directory()
    directory.slapd.delete(bob)
    settings.RELAY_MAP_POSTMAP = unsupported_postmap_type()

    with pytest.raises(DirectorySyncFailed, match="^directory sync failed, nothing changed"):
        sync_directory_task()

    assert User.objects.get(username="bob@example.test").is_active
    assert addresses_of("bob@example.test") == {"bob@example.test"}


def test_a_failed_map_write_does_not_leave_writerelaymap_a_map_without_valid_addresses(
        settings, directory):
    """An address that moves in AD from a person to a group stays deliverable. If the sync
    fails while writing the map (postmap error), a later `writerelaymap` (the documented
    way to rebuild the map from the database and the side file) must still list it: the
    database and the side file RELAY_MAP_DIRECTORY_EXTRA must not be left disagreeing."""
    _staff(directory)
    alice = directory.person("Alice", mail="alice@example.test",
                             proxy=["SMTP:alice@example.test", "smtp:sales@example.test"])
    sync_directory()
    directory.slapd.modify(alice, {"proxyAddresses": ["SMTP:alice@example.test"]})
    directory.object("group", "Sales", proxy=["SMTP:sales@example.test"])
    hash_type = settings.RELAY_MAP_POSTMAP
    settings.RELAY_MAP_POSTMAP = unsupported_postmap_type()
    with pytest.raises(PostmapFailed):
        sync_directory()
    settings.RELAY_MAP_POSTMAP = hash_type

    write_relay_map()

    assert "sales@example.test" in map_keys(settings)


def test_the_side_file_and_the_map_are_replaced_together(settings, directory, monkeypatch):
    """`writerelaymap` may run while the nightly sync runs (both take the map's lock). The
    sync must not release the map lock between writing the map and writing the side file
    of group/contact/folder addresses: a writer that gets the lock in between rebuilds the
    map from the new database but the old side file and drops the new group's address."""
    _staff(directory)
    sync_directory()
    directory.object("group", "Sales", proxy=["SMTP:sales@example.test"])
    real_write_address_file = relaymap.write_address_file

    def writerelaymap_gets_the_lock_first(path, addresses):
        # What a concurrent `manage.py writerelaymap` does when it gets the lock as soon
        # as the sync releases it after writing the map.
        write_relay_map()
        real_write_address_file(path, addresses)

    monkeypatch.setattr(relaymap, "write_address_file", writerelaymap_gets_the_lock_first)

    sync_directory()

    assert "sales@example.test" in map_keys(settings)


# --- the map's text and its database --------------------------------------------------


def test_the_postmap_database_never_disagrees_with_the_text(settings, directory):
    """With RELAY_MAP_POSTMAP=hash Postfix reads relay_recipients.db. If postmap cannot be
    run (not on the worker's PATH), the sync must not replace the text and leave the old
    database in place: the new recipient is in the text but Postfix, reading the stale
    database, refuses it. Either both are replaced or the sync fails and neither is."""
    _staff(directory)
    sync_directory()
    directory.person("Carol", mail="carol@example.test")
    settings.RELAY_MAP_POSTMAP_COMMAND = "/nonexistent/bin/postmap"

    try:
        sync_directory()
    except relaymap.RelayMapError:
        pass

    text = map_keys(settings)
    for key in text:
        assert postmap_query(key, settings.RELAY_MAP_PATH).stdout.strip() == "OK", key


# --- checked and found correct -----------------------------------------------------------


def test_a_referral_under_the_base_dn_is_skipped_and_the_rest_is_read(settings, directory):
    """A search continuation reference (AD's DNS partitions) is skipped, not followed, and
    does not stop the sync."""
    _staff(directory, 2)
    directory.slapd.add(f"ou=elsewhere,{directory.dn}", {
        "objectClass": ["referral", "extensibleObject"], "ou": ["elsewhere"],
        "ref": ["ldap://192.0.2.1/ou=elsewhere,dc=example,dc=test"]})

    sync_directory()

    assert map_keys(settings) == ["staff0@example.test", "staff1@example.test"]


def test_a_base_dn_that_is_a_referral_fails_the_sync_without_changes(settings, directory):
    """A base DN that is a referral object is an error (nothing changed), not an empty
    directory that retires everyone."""
    _staff(directory, 2)
    sync_directory()
    before = settings.RELAY_MAP_PATH.read_bytes()
    directory.slapd.add(f"ou=elsewhere,{directory.dn}", {
        "objectClass": ["referral", "extensibleObject"], "ou": ["elsewhere"],
        "ref": ["ldap://192.0.2.1/ou=elsewhere,dc=example,dc=test"]})
    settings.LDAP_BASE_DN = [f"ou=elsewhere,{directory.dn}"]

    with pytest.raises(DirectoryError):
        sync_directory(force=True)

    assert User.objects.filter(is_active=True).count() == 2
    assert settings.RELAY_MAP_PATH.read_bytes() == before


def test_a_page_size_above_the_server_limit_is_a_clear_error_and_writes_no_map(
    settings, directory
):
    """LDAP_PAGE_SIZE above the server's page size limit: the server refuses the search
    (administrative limit), and the sync says so and writes no map, rather than taking
    the first page for the whole directory."""
    from directory.ldap import DirectoryIncomplete
    from tests.directory.slapd import BIG_OU

    settings.LDAP_BASE_DN = [BIG_OU]
    settings.LDAP_PAGE_SIZE = 5000

    with pytest.raises(DirectoryIncomplete, match="limit"):
        sync_directory()

    assert not settings.RELAY_MAP_PATH.exists()
    assert User.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_two_syncs_at_once_one_runs_the_other_is_busy(settings, directory):
    """Two syncs started together (a retry overlapping beat): exactly one runs."""
    _staff(directory, 3)
    results: list = []

    def run() -> None:
        from django.db import connection
        try:
            results.append(sync_directory())
        except SyncBusy as exc:
            results.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    assert sum(isinstance(r, SyncBusy) for r in results) <= 1
    assert User.objects.count() == 3
    assert Address.objects.count() == 3


# --- a log-in while the sync runs -----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_first_login_during_the_sync_does_not_break_the_sync(settings, directory,
                                                               monkeypatch):
    """A person who logs in for the first time while the nightly sync runs gets their
    viewer user from the login path (user_for_login, which takes no sync lock). The sync,
    reaching the same directory object (same objectGUID), must use that user, not crash
    with an IntegrityError that throws away the whole night's sync (and escapes the Celery
    task's "failed, nothing changed" handling)."""
    from directory import sync as sync_module
    from directory.sync import user_for_login

    _staff(directory, 3)
    guid = uuid.uuid4().bytes
    dn = directory.person("Newcomer", mail="new@example.test", guid=guid)
    real_create_user = sync_module._create_user
    logged_in: list = []
    main = threading.get_ident()

    def login_meanwhile(obj, taken, summary):
        # user_for_login calls _create_user too: only the sync's call (main thread) waits
        # for the log-in.
        if obj.dn == dn and threading.get_ident() == main and not logged_in:
            def login() -> None:
                from django.db import connection
                try:
                    logged_in.append(user_for_login(dn, {
                        "mail": [b"new@example.test"], "objectGUID": [guid],
                        "userAccountControl": [b"512"]}))
                finally:
                    connection.close()
            thread = threading.Thread(target=login)
            thread.start()
            thread.join()
        return real_create_user(obj, taken, summary)

    monkeypatch.setattr(sync_module, "_create_user", login_meanwhile)

    result = sync_directory_task()

    assert logged_in and logged_in[0] is not None
    assert result.startswith("4 directory objects"), result
    assert addresses_of("new@example.test") == {"new@example.test"}
