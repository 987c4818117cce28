"""Edge cases of logging in and of account handling, against the real slapd (started by the
fixtures of tests/directory/conftest.py, imported here) and PostgreSQL.

Rules (spec: /work/shared/spec/active-directory.md, directory/auth.py, directory/sync.py,
directory/throttle.py, docs/configuration.md):
- each address belongs to exactly one user; an address the directory gives to two objects
  is given to neither (directory/sync.py);
- the log-in throttle counts attempts per account name, so that guessing here stays below
  the directory's lockout threshold (docs/configuration.md LOGIN_FAILURE_LIMIT);
- vadmin's password meets the password policy like every other.
"""

from __future__ import annotations

import io
import uuid

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client

from directory.models import Address, DirectoryIdentity
from directory.sync import sync_directory
from tests.conftest import PASSWORD as LOCAL_PASSWORD
from tests.directory.conftest import directory, relay_map, slapd  # noqa: F401 (fixtures)
from tests.directory.slapd import PASSWORD

pytestmark = [pytest.mark.django_db]

BACKENDS = ["directory.auth.LocalAccountBackend", "directory.auth.DirectoryBackend"]


@pytest.fixture
def ldap_login(settings, directory):  # noqa: F811
    settings.LOGIN_METHOD = "ldap"
    settings.AUTHENTICATION_BACKENDS = BACKENDS
    return directory


def _staff(directory, count: int = 6) -> None:  # noqa: F811
    """Some ordinary people, so that one change does not trip the relay map shrink ratio."""
    for i in range(count):
        directory.person(f"Staff {i}", mail=f"staff{i}@example.test")


def _post(username: str, password: str, *, ip: str = "192.0.2.1"):
    client = Client(REMOTE_ADDR=ip)
    return client.post("/login/", {"username": username, "password": password},
                       REMOTE_ADDR=ip)


def _logged_in_as(response) -> str | None:
    if response.status_code != 302:
        return None
    user_id = response.client.session.get("_auth_user_id")
    return User.objects.get(pk=user_id).username if user_id else None


def _fullwidth(text: str, index: int) -> str:
    """`text` with the character at `index` replaced by its full-width form (NFKC maps it
    back to the ASCII character)."""
    char = text[index]
    return text[:index] + chr(ord(char) - 0x21 + 0xFF01) + text[index + 1:]


# --- the throttle --------------------------------------------------------------------


def test_the_account_throttle_is_not_bypassed_by_compatibility_forms_of_the_name(world):
    """The log-in form normalises the typed name with NFKC (Django's UsernameField), so
    'ａlice' (full-width a) logs in as 'alice'. The throttle must count it as the same
    account name: after LOGIN_FAILURE_LIMIT (10) failures at 'alice', every further
    attempt at that account is refused with 429, whatever Unicode form the name is typed
    in (docs/configuration.md LOGIN_FAILURE_LIMIT; directory/throttle.py account_key)."""
    for i in range(10):
        assert _post("alice", f"guess {i}", ip=f"192.0.2.{i + 1}").status_code == 200
    assert _post("alice", "guess 10", ip="192.0.2.50").status_code == 429

    # Ten more guesses at the same account, each under another spelling of its name
    # (every one of them is "alice" once the form has normalised it).
    spellings = [_fullwidth("alice", i) for i in range(5)] + [
        _fullwidth(_fullwidth("alice", 0), i) for i in range(1, 5)] + [
        "".join(chr(ord(c) - 0x21 + 0xFF01) for c in "alice")]
    statuses = [_post(name, f"more guesses {i}", ip=f"192.0.2.{i + 100}").status_code
                for i, name in enumerate(spellings)]
    right = _post(_fullwidth("alice", 4), LOCAL_PASSWORD, ip="192.0.2.200")

    assert len(set(spellings)) == 10
    assert _logged_in_as(right) is None
    assert right.status_code == 429
    assert statuses == [429] * 10


# --- addresses a login hands out ------------------------------------------------------


@pytest.mark.slapd
def test_a_login_does_not_take_an_address_the_sync_gave_to_nobody(ldap_login):
    """An address two directory objects claim is "given to neither of them"
    (directory/sync.py; each address belongs to exactly one user). After the sync has
    settled that, the first of the two people to log in must not get it: otherwise that
    person sees the other's quarantined mail for it, and which one gets it depends on who
    logs in first."""
    _staff(ldap_login)
    ldap_login.person("Twin One", mail="one@example.test",
                      proxy=["SMTP:one@example.test", "smtp:twins@example.test"])
    ldap_login.person("Twin Two", mail="two@example.test",
                      proxy=["SMTP:two@example.test", "smtp:twins@example.test"])
    summary = sync_directory()
    assert any("twins@example.test is claimed by 2" in c for c in summary.conflicts)
    assert not Address.objects.filter(address="twins@example.test").exists()

    response = _post("one@example.test", PASSWORD)

    assert _logged_in_as(response) == "one@example.test"
    assert list(Address.objects.filter(address="twins@example.test")
                .values_list("user__username", flat=True)) == []


@pytest.mark.slapd
def test_a_login_does_not_take_an_address_a_group_also_claims(ldap_login):
    """Same rule for a person and a distribution group sharing an address: the sync gives
    it to no user (it stays in the relay map only); a log-in of the person must not hand
    the group's mail to them."""
    _staff(ldap_login)
    ldap_login.person("Carol", mail="carol@example.test",
                      proxy=["SMTP:carol@example.test", "smtp:sales@example.test"])
    ldap_login.object("group", "Sales", proxy=["SMTP:sales@example.test"])
    sync_directory()
    assert not Address.objects.filter(address="sales@example.test").exists()

    response = _post("carol@example.test", PASSWORD)

    assert _logged_in_as(response) == "carol@example.test"
    assert not Address.objects.filter(address="sales@example.test").exists()


# --- the viewer user a login lands in ---------------------------------------------------


@pytest.mark.slapd
def test_a_person_recreated_in_the_directory_can_log_in_before_the_next_sync(ldap_login):
    """An AD account deleted and made again (new objectGUID, same primary address) is the
    same mailbox: as the sync would, the first login of the new account takes over the
    old viewer user, whose object is gone, rather than failing until the nightly sync."""
    old = ldap_login.person("Alice", mail="alice@example.test")
    assert _logged_in_as(_post("alice@example.test", PASSWORD)) == "alice@example.test"
    ldap_login.slapd.delete(old)
    ldap_login.person("Alice", mail="alice@example.test", guid=uuid.uuid4().bytes)

    response = _post("alice@example.test", PASSWORD, ip="192.0.2.2")

    assert _logged_in_as(response) == "alice@example.test"
    assert User.objects.filter(username__iexact="alice@example.test").count() == 1
    assert DirectoryIdentity.objects.count() == 1


@pytest.mark.slapd
def test_a_login_does_not_take_over_a_user_whose_object_is_still_there(ldap_login):
    """Two directory objects with the same primary address at once (one a leftover): the
    second one's login takes nothing over while the first object is still in the
    directory, and lands in no user."""
    ldap_login.person("Alice", mail="alice@example.test")
    assert _logged_in_as(_post("alice@example.test", PASSWORD)) == "alice@example.test"
    first = DirectoryIdentity.objects.get()
    ldap_login.person("Alice Two", mail="alice@example.test", sam="alice2",
                      guid=uuid.uuid4().bytes)

    response = _post("alice2", PASSWORD, ip="192.0.2.2")

    assert _logged_in_as(response) is None
    assert DirectoryIdentity.objects.get() == first
    assert DirectoryIdentity.objects.get().guid == first.guid


# --- vadmin -----------------------------------------------------------------------------


@pytest.mark.parametrize("password", ["vadmin", "1234567890", "password", "   "])
def test_ensurevadmin_refuses_a_vadmin_password_the_password_policy_refuses(
        monkeypatch, db, password):
    """vadmin is the superuser of an Internet-facing console; every other way of setting a
    password here (adding a user, editing one, vadmin's own password page) applies
    AUTH_PASSWORD_VALIDATORS (at least 10 characters, not common, not all digits, not like
    the user name). `ensurevadmin` must apply them to VADMIN_PASSWORD too: refuse with a
    clear error and create no vadmin, rather than create it with 'vadmin' or a blank."""
    monkeypatch.setenv("VADMIN_PASSWORD", password)
    monkeypatch.delenv("VADMIN_PASSWORD_FILE", raising=False)

    with pytest.raises(CommandError):
        call_command("ensurevadmin", stdout=io.StringIO())

    assert not User.objects.filter(username="vadmin").exists()

