"""The directory sync against a real slapd: users, addresses and the relay map."""

from __future__ import annotations

import fcntl
import io
import socket
import time

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError

from directory.ldap import BaseDNNotFound, DirectoryUnreachable
from directory.models import Address, DirectoryIdentity
from directory.relaymap import RelayMapShrinkRefused
from directory.sync import DirectoryEmpty, SyncBusy, sync_directory
from tests.directory.conftest import addresses_of, map_keys
from tests.directory.slapd import BIG_OU, big_ldif_expected, mail_object

pytestmark = [pytest.mark.slapd, pytest.mark.django_db]


def test_sync_finds_every_address_of_a_directory_larger_than_a_page(settings, directory):
    settings.LDAP_BASE_DN = [BIG_OU]
    expected = big_ldif_expected()
    started = time.monotonic()

    summary = sync_directory()

    elapsed = time.monotonic() - started
    people = expected["users"] | expected["disabled"] | expected["shared"]
    assert set(User.objects.values_list("username", flat=True)) == people
    assert set(User.objects.filter(is_active=True).values_list("username", flat=True)
               ) == expected["users"]
    with_mail = expected["users"] | expected["shared"]
    aliases = {a.replace("person", "p") for a in with_mail}
    assert set(Address.objects.values_list("address", flat=True)) == with_mail | aliases
    assert set(map_keys(settings)) == with_mail | aliases | expected["others"]
    assert summary.users_added == len(people)
    assert summary.map_only == len(expected["others"])
    assert summary.conflicts == []
    assert "ws01@example.test" not in map_keys(settings)
    assert elapsed < 60


def test_a_person_is_named_by_the_primary_address_and_gets_all_smtp_addresses(directory):
    dn = directory.person("Alice Smith", mail="alice@example.test", proxy=[
        "smtp:a.smith@example.test", "SMTP:Alice.Smith@Example.test",
        "sMtP:odd.case@example.test", "X400:c=US;a= ;p=Example;o=Exchange;s=Smith",
        "X500:/o=Example/ou=Exchange/cn=Recipients/cn=alice", "SIP:alice@example.test",
        "EUM:1234;phone-context=example.test",
    ])

    sync_directory()

    user = User.objects.get()
    assert user.username == "alice.smith@example.test"
    assert user.is_active and not user.has_usable_password()
    assert addresses_of(user.username) == {
        "alice.smith@example.test", "a.smith@example.test", "odd.case@example.test",
        "alice@example.test"}
    assert set(Address.objects.values_list("source", flat=True)) == {Address.SOURCE_LDAP}
    assert user.directory_identity.dn == dn
    assert len(user.directory_identity.guid) == 32


def test_groups_contacts_and_public_folders_go_into_the_map_but_are_not_users(
        settings, slapd, directory):
    folders = slapd.new_ou()
    settings.LDAP_BASE_DN = [directory.dn, folders]
    directory.person("Alice", mail="alice@example.test")
    directory.object("group", "Sales", proxy=["SMTP:sales@example.test",
                                              "smtp:vertrieb@example.test"])
    directory.object("contact", "Partner", mail="bob@partner.example",
                     proxy=["SMTP:bob@partner.example", "smtp:partner.bob@example.test"])
    slapd.add(f"cn=Help,{folders}",
              mail_object("publicFolder", "Help", proxy=["SMTP:help@example.test"]))
    directory.object("group", "Not mail-enabled")

    summary = sync_directory()

    assert list(User.objects.values_list("username", flat=True)) == ["alice@example.test"]
    assert map_keys(settings) == [
        "alice@example.test", "bob@partner.example", "help@example.test",
        "partner.bob@example.test", "sales@example.test", "vertrieb@example.test"]
    assert summary.map_only == 5
    assert sorted(settings.RELAY_MAP_DIRECTORY_EXTRA.read_text().split()) == [
        "bob@partner.example", "help@example.test", "partner.bob@example.test",
        "sales@example.test", "vertrieb@example.test"]


def test_a_disabled_person_cannot_log_in_and_leaves_the_map_but_shared_mailboxes_stay(
        settings, directory):
    directory.person("Alice", mail="alice@example.test")
    directory.person("Leaver", mail="leaver@example.test", disabled=True)
    directory.person("Shared", mail="info@example.test", disabled=True, recipient_type=4)
    directory.person("Room", mail="room1@example.test", disabled=True, recipient_type=16)
    directory.person("Beamer", mail="beamer@example.test", disabled=True, recipient_type=32)

    sync_directory()

    active = dict(User.objects.values_list("username", "is_active"))
    assert active == {"alice@example.test": True, "leaver@example.test": False,
                      "info@example.test": False, "room1@example.test": False,
                      "beamer@example.test": False}
    assert map_keys(settings) == ["alice@example.test", "beamer@example.test",
                              "info@example.test", "room1@example.test"]
    assert addresses_of("leaver@example.test") == set()


def test_an_account_disabled_later_loses_login_and_map_entry(settings, directory):
    directory.person("Alice", mail="alice@example.test")
    dn = directory.person("Bob", mail="bob@example.test")
    sync_directory()
    directory.slapd.modify(dn, {"userAccountControl": ["514"]})

    summary = sync_directory()

    assert not User.objects.get(username="bob@example.test").is_active
    assert summary.users_disabled == 1
    assert map_keys(settings) == ["alice@example.test"]


def test_a_renamed_and_moved_person_stays_the_same_user(settings, slapd, directory):
    dn = directory.person("Alice", mail="alice@example.test",
                          proxy=["SMTP:alice@example.test"])
    directory.person("Bob", mail="bob@example.test")
    sync_directory()
    user_pk = User.objects.get(username="alice@example.test").pk
    new_dn = slapd.rename(dn, "cn=Alice Married")
    slapd.modify(new_dn, {"mail": ["alice.married@example.test"], "proxyAddresses": [
        "SMTP:alice.married@example.test", "smtp:alice@example.test"]})

    summary = sync_directory()

    user = User.objects.get(pk=user_pk)
    assert user.username == "alice.married@example.test"
    assert user.directory_identity.dn == new_dn
    assert addresses_of(user.username) == {"alice.married@example.test", "alice@example.test"}
    assert User.objects.count() == 2
    assert summary.users_added == 0 and summary.users_updated == 1


def test_an_address_moved_in_the_directory_moves_between_users(directory):
    alice = directory.person("Alice", mail="alice@example.test",
                             proxy=["SMTP:alice@example.test", "smtp:sales@example.test"])
    bob = directory.person("Bob", mail="bob@example.test")
    sync_directory()
    directory.slapd.modify(alice, {"proxyAddresses": ["SMTP:alice@example.test"]})
    directory.slapd.modify(bob, {"proxyAddresses": ["SMTP:bob@example.test",
                                                    "smtp:sales@example.test"]})

    summary = sync_directory()

    assert addresses_of("alice@example.test") == {"alice@example.test"}
    assert addresses_of("bob@example.test") == {"bob@example.test", "sales@example.test"}
    assert (summary.addresses_moved, summary.addresses_added, summary.addresses_removed
            ) == (1, 0, 0)


def test_an_address_claimed_by_two_objects_goes_to_neither_and_is_reported(
        settings, directory):
    directory.person("Alice", mail="alice@example.test",
                     proxy=["SMTP:alice@example.test", "smtp:team@example.test"])
    directory.person("Bob", mail="bob@example.test",
                     proxy=["SMTP:bob@example.test", "smtp:team@example.test"])
    directory.object("group", "Team", proxy=["SMTP:team@example.test"])

    summary = sync_directory()

    assert not Address.objects.filter(address="team@example.test").exists()
    assert "team@example.test" in map_keys(settings)
    assert len(summary.conflicts) == 1
    assert "team@example.test is claimed by 3 directory objects" in summary.conflicts[0]


def test_a_person_removed_from_the_directory_is_disabled_and_local_edits_stay(
        settings, directory):
    directory.person("Alice", mail="alice@example.test")
    bob = directory.person("Bob", mail="bob@example.test")
    sync_directory()
    bob_user = User.objects.get(username="bob@example.test")
    Address.objects.create(user=bob_user, address="bob.private@example.test")
    directory.slapd.delete(bob)

    summary = sync_directory()

    bob_user.refresh_from_db()
    assert not bob_user.is_active
    assert addresses_of("bob@example.test") == {"bob.private@example.test"}
    assert map_keys(settings) == ["alice@example.test", "bob.private@example.test"]
    assert (summary.users_disabled, summary.addresses_removed) == (1, 1)


def test_clear_deletes_directory_users_that_are_gone_and_keeps_local_users(
        settings, directory):
    directory.person("Alice", mail="alice@example.test")
    bob = directory.person("Bob", mail="bob@example.test")
    local = User.objects.create_user("carol", password="local password 123")
    Address.objects.create(user=local, address="carol@example.test")
    sync_directory()
    directory.slapd.delete(bob)

    summary = sync_directory(clear=True)

    assert set(User.objects.values_list("username", flat=True)) == {
        "alice@example.test", "carol"}
    assert addresses_of("carol") == {"carol@example.test"}
    assert summary.users_deleted == 1
    assert map_keys(settings) == ["alice@example.test", "carol@example.test"]


def test_a_local_address_is_a_conflict_by_default_and_redrawn_by_clear(directory):
    local = User.objects.create_user("carol", password="local password 123")
    Address.objects.create(user=local, address="alice.old@example.test")
    Address.objects.create(user=local, address="carol@example.test")
    directory.person("Alice", mail="alice@example.test",
                     proxy=["SMTP:alice@example.test", "smtp:alice.old@example.test"])

    summary = sync_directory()

    assert addresses_of("carol") == {"alice.old@example.test", "carol@example.test"}
    assert addresses_of("alice@example.test") == {"alice@example.test"}
    assert any("belongs to the local user carol" in c for c in summary.conflicts)

    summary = sync_directory(clear=True)

    assert addresses_of("carol") == {"carol@example.test"}
    assert addresses_of("alice@example.test") == {"alice@example.test",
                                                "alice.old@example.test"}
    assert summary.addresses_moved == 1


def test_a_local_user_with_the_primary_address_as_name_is_never_taken_over(directory):
    local = User.objects.create_user("alice@example.test", password="local password 123")
    directory.person("Alice", mail="alice@example.test")
    directory.person("Bob", mail="bob@example.test")

    summary = sync_directory()

    assert not DirectoryIdentity.objects.filter(user=local).exists()
    local.refresh_from_db()
    assert local.check_password("local password 123")
    assert any("a local user named alice@example.test exists" in c
               for c in summary.conflicts)


def test_hostile_directory_values_never_reach_users_or_the_map(settings, directory):
    directory.person("Alice", mail="alice@example.test", proxy=[
        "SMTP:alice@example.test", "smtp: lead@example.test", "smtp:two words@example.test",
        "smtp:hash#tag@example.test", "smtp:cr\r@example.test", "smtp:lf\nx@example.test",
        'smtp:"quoted"@example.test', "smtp:@catchall.example", "smtp:ünï@example.test",
        "smtp:" + "x" * 10_000 + "@example.test", "smtp:fine@example.test",
    ])

    summary = sync_directory()

    assert addresses_of("alice@example.test") == {"alice@example.test", "fine@example.test"}
    assert settings.RELAY_MAP_PATH.read_text() == (
        "alice@example.test OK\nfine@example.test OK\n")
    assert len(summary.invalid) == 9


def test_an_unreachable_directory_changes_nothing(settings, directory):
    directory.person("Alice", mail="alice@example.test")
    sync_directory()
    before = settings.RELAY_MAP_PATH.read_bytes()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings.LDAP_SERVER = f"ldaps://127.0.0.1:{port}"

    with pytest.raises(DirectoryUnreachable):
        sync_directory(clear=True)

    assert User.objects.get().is_active
    assert addresses_of("alice@example.test") == {"alice@example.test"}
    assert settings.RELAY_MAP_PATH.read_bytes() == before


def test_a_directory_with_no_entries_changes_nothing(settings, slapd, directory):
    directory.person("Alice", mail="alice@example.test")
    sync_directory()
    before = settings.RELAY_MAP_PATH.read_bytes()
    settings.LDAP_BASE_DN = [slapd.new_ou()]

    with pytest.raises(DirectoryEmpty, match="nothing changed"):
        sync_directory(force=True)

    assert User.objects.get().is_active
    assert settings.RELAY_MAP_PATH.read_bytes() == before


def test_a_missing_base_dn_stops_the_sync_before_any_change(settings, directory):
    directory.person("Alice", mail="alice@example.test")
    sync_directory()
    settings.LDAP_BASE_DN = [directory.dn, f"ou=gone,{directory.dn}"]

    with pytest.raises(BaseDNNotFound, match=f"ou=gone,{directory.dn}"):
        sync_directory()

    assert User.objects.get().is_active


def test_a_sync_that_would_shrink_the_map_too_much_is_refused_unless_forced(
        settings, directory):
    dns = [directory.person(f"P{i}", mail=f"p{i}@example.test") for i in range(10)]
    sync_directory()
    before = settings.RELAY_MAP_PATH.read_bytes()
    for dn in dns[:8]:
        directory.slapd.delete(dn)

    with pytest.raises(RelayMapShrinkRefused, match="new map has 2 addresses, the current "
                                                    "one 10"):
        sync_directory()

    assert User.objects.filter(is_active=True).count() == 10
    assert Address.objects.count() == 10
    assert settings.RELAY_MAP_PATH.read_bytes() == before

    sync_directory(force=True)

    assert User.objects.filter(is_active=True).count() == 2
    assert len(map_keys(settings)) == 2


def test_a_dry_run_reports_and_changes_nothing(settings, directory):
    directory.person("Alice", mail="alice@example.test")
    directory.person("Bob", mail="bob@example.test")

    summary = sync_directory(dry_run=True)

    assert (summary.users_added, summary.addresses_added) == (2, 2)
    assert not User.objects.exists()
    assert not settings.RELAY_MAP_PATH.exists()


def test_a_second_sync_does_not_run_while_one_is_running(settings, directory):
    directory.person("Alice", mail="alice@example.test")
    settings.DIRECTORY_SYNC_LOCK.parent.mkdir(exist_ok=True)
    with open(settings.DIRECTORY_SYNC_LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SyncBusy):
            sync_directory()
    assert not User.objects.exists()


def test_syncdirectory_prints_a_summary_line(directory):
    directory.person("Alice", mail="alice@example.test")
    out = io.StringIO()

    call_command("syncdirectory", stdout=out)

    assert ("1 directory objects; users added 1, updated 0, disabled 0, deleted 0; "
            "addresses added 1, moved 0, removed 0; 0 conflicts; 0 invalid values; "
            "relay map 1 addresses") in out.getvalue()


def test_syncdirectory_fails_loudly_when_the_directory_is_unreachable(settings, directory):
    settings.LDAP_SERVER = "ldaps://127.0.0.1:1"

    with pytest.raises(CommandError, match="nothing changed.*ldaps://127.0.0.1:1"):
        call_command("syncdirectory", stdout=io.StringIO())
