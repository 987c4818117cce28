"""Logging in at /login/ with LOGIN_METHOD=ldap, against the real slapd."""

from __future__ import annotations

import time

import pytest
from django.contrib.auth import authenticate
from django.contrib.auth.models import User
from django.test import Client
from ldap.dn import str2dn

from directory.models import Address, DirectoryIdentity
from tests.conftest import PASSWORD as LOCAL_PASSWORD
from tests.directory.slapd import PASSWORD

pytestmark = [pytest.mark.slapd, pytest.mark.django_db]

ALICE_CN = "Smith, Alice (IT) \\ Ops"


@pytest.fixture
def people(settings, directory):
    settings.LOGIN_METHOD = "ldap"
    settings.AUTHENTICATION_BACKENDS = [
        "directory.auth.LocalAccountBackend",
        "directory.auth.DirectoryBackend",
    ]
    # A DN with every character that DN syntax escapes, to show the DN is used as the
    # server returned it and never escaped twice.
    directory.person(ALICE_CN, mail="alice@example.test", upn="a*(smith)@corp.example.test",
                     proxy=["SMTP:alice@example.test", "smtp:a.smith@example.test",
                            "X500:/o=Example/cn=alice"])
    directory.person("Leaver", mail="leaver@example.test", disabled=True)
    directory.person("Twin One", mail="one@example.test",
                     proxy=["SMTP:one@example.test", "smtp:twins@example.test"])
    directory.person("Twin Two", mail="two@example.test",
                     proxy=["SMTP:two@example.test", "smtp:twins@example.test"])
    return directory


def _login(username: str, password: str) -> tuple[Client, object]:
    client = Client()
    response = client.post("/login/", {"username": username, "password": password})
    return client, response


def _logged_in_as(client: Client) -> str | None:
    user_id = client.session.get("_auth_user_id")
    return User.objects.get(pk=user_id).username if user_id else None


def test_the_right_password_logs_in_as_the_user_named_by_the_primary_address(people):
    client, response = _login("alice@example.test", PASSWORD)

    assert response.status_code == 302
    assert _logged_in_as(client) == "alice@example.test"
    user = User.objects.get(username="alice@example.test")
    assert not user.has_usable_password()
    assert str2dn(DirectoryIdentity.objects.get(user=user).dn)[0][0][1] == ALICE_CN


def test_login_refreshes_the_users_addresses_from_the_directory(people):
    _login("alice@example.test", PASSWORD)
    user = User.objects.get(username="alice@example.test")
    Address.objects.filter(user=user).delete()
    Address.objects.create(user=user, address="gone@example.test", source=Address.SOURCE_LDAP)
    Address.objects.create(user=user, address="alice.home@example.test")

    client, _ = _login("a.smith@example.test", PASSWORD)

    assert _logged_in_as(client) == "alice@example.test"
    assert set(user.addresses.values_list("address", "source")) == {
        ("alice@example.test", "ldap"), ("a.smith@example.test", "ldap"),
        ("alice.home@example.test", "local")}


@pytest.mark.parametrize("typed", ["a.smith@example.test", "A.Smith@Example.TEST",
                                   "a*(smith)@corp.example.test"])
def test_an_alias_or_the_upn_logs_in_as_the_same_user(people, typed):
    client, response = _login(typed, PASSWORD)

    assert response.status_code == 302
    assert _logged_in_as(client) == "alice@example.test"
    assert User.objects.filter(username__startswith="a").count() == 1


def test_a_wrong_password_does_not_log_in(people):
    client, response = _login("alice@example.test", "wrong password")

    assert response.status_code == 200
    assert b"not right" in response.content
    assert _logged_in_as(client) is None


@pytest.mark.parametrize("password", ["", " ", "   \t", "\x00", PASSWORD + "\x00"])
def test_an_empty_password_is_refused_before_any_bind(people, slapd, password):
    binds_before = len(slapd.binds())

    assert authenticate(username="alice@example.test", password=password) is None
    client, response = _login("alice@example.test", password)

    assert _logged_in_as(client) is None
    time.sleep(0.05)
    assert len(slapd.binds()) == binds_before


def test_a_disabled_account_does_not_log_in(people):
    client, _ = _login("leaver@example.test", PASSWORD)

    assert _logged_in_as(client) is None
    assert not User.objects.filter(username="leaver@example.test").exists()


def test_an_address_two_people_share_is_ambiguous_and_logs_in_nobody(people):
    client, _ = _login("twins@example.test", PASSWORD)

    assert _logged_in_as(client) is None


@pytest.mark.parametrize("typed", [
    "*", "alice*", "*@example.test", "*)(uid=*", "*)(|(objectClass=*)", "\\2a",
    "alice@example.test)(mail=*", ")(sAMAccountName=vadmin", "alice@example.test\x00",
    "\\61lice@example.test",
])
def test_ldap_filter_injection_matches_nobody(people, typed):
    # Alice is the only enabled person with this password: a filter that let the typed
    # wildcard through would find her alone and the bind would succeed.
    people.slapd.modify(f"cn=Twin One,{people.dn}", {"userPassword": ["other 1"]})
    people.slapd.modify(f"cn=Twin Two,{people.dn}", {"userPassword": ["other 2"]})

    client, _ = _login(typed, PASSWORD)

    assert _logged_in_as(client) is None
    assert authenticate(username=typed, password=PASSWORD) is None


def test_vadmin_logs_in_with_the_local_password_in_ldap_mode(people):
    User.objects.create_superuser("vadmin", "", LOCAL_PASSWORD)

    client, response = _login("vadmin", LOCAL_PASSWORD)

    assert response.status_code == 302
    assert _logged_in_as(client) == "vadmin"


def test_a_directory_user_never_logs_in_with_a_local_password(people):
    _login("alice@example.test", PASSWORD)
    user = User.objects.get(username="alice@example.test")
    user.set_password("a local password 123")
    user.save()

    client, _ = _login("alice@example.test", "a local password 123")

    assert _logged_in_as(client) is None


def test_a_local_account_named_like_a_directory_address_is_not_taken_over(people):
    local = User.objects.create_user("alice@example.test", password=LOCAL_PASSWORD)

    client, _ = _login("alice@example.test", PASSWORD)

    assert _logged_in_as(client) is None
    assert not DirectoryIdentity.objects.filter(user=local).exists()


def test_a_wrong_sync_password_fails_the_login_closed(settings, people):
    settings.LDAP_BIND_PASSWORD = "not the sync password"

    client, response = _login("alice@example.test", PASSWORD)

    assert response.status_code == 200
    assert _logged_in_as(client) is None


def test_an_unreachable_directory_fails_the_login_closed(settings, people):
    settings.LDAP_SERVER = "ldaps://127.0.0.1:1"

    client, response = _login("alice@example.test", PASSWORD)

    assert response.status_code == 200
    assert b"not right" in response.content
    assert _logged_in_as(client) is None


def test_a_user_disabled_by_the_sync_loses_the_session_on_the_next_request(people):
    client, _ = _login("alice@example.test", PASSWORD)
    assert client.get("/").status_code == 200

    User.objects.filter(username="alice@example.test").update(is_active=False)

    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")
