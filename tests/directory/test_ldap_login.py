"""Logging in at /login/ with LOGIN_METHOD=ldap, against the real slapd."""

from __future__ import annotations

import re
import time
from importlib import import_module

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import authenticate
from django.contrib.auth.models import User
from django.test import Client
from ldap.dn import str2dn

from directory.models import Address, DirectoryIdentity
from tests.conftest import PASSWORD as LOCAL_PASSWORD
from tests.directory.slapd import PASSWORD, person, start_slapd

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
                     sam="asmith",
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


@pytest.mark.parametrize("typed", ["EXAMPLE\\asmith", "example\\ASMITH", "asmith", "ASmith",
                                   " Example\\asmith "])
def test_the_sam_account_name_logs_in_bare_or_behind_our_netbios_domain(settings, people,
                                                                        typed):
    settings.LDAP_NETBIOS_DOMAIN = "EXAMPLE"

    client, response = _login(typed, PASSWORD)

    assert response.status_code == 302
    assert _logged_in_as(client) == "alice@example.test"
    assert User.objects.filter(username__startswith="a").count() == 1


@pytest.mark.parametrize("typed", ["OTHER\\asmith", "EXAMPLE\\EXAMPLE\\asmith", "\\asmith",
                                   "EXAMPLE\\", "EXAMPLE\\alice@example.test\\"])
def test_a_domain_prefix_other_than_ours_logs_in_nobody(settings, people, typed):
    settings.LDAP_NETBIOS_DOMAIN = "EXAMPLE"

    client, _ = _login(typed, PASSWORD)

    assert _logged_in_as(client) is None


def test_without_a_netbios_domain_a_domain_prefix_logs_in_nobody(settings, people):
    settings.LDAP_NETBIOS_DOMAIN = ""

    client, _ = _login("EXAMPLE\\asmith", PASSWORD)

    assert _logged_in_as(client) is None


@pytest.mark.parametrize("typed", ["jsmith", "EXAMPLE\\jsmith"])
def test_a_sam_account_name_two_people_share_is_ambiguous_and_logs_in_nobody(
        settings, people, typed):
    settings.LDAP_NETBIOS_DOMAIN = "EXAMPLE"
    people.person("John Smith", mail="john.smith@example.test", sam="jsmith")
    people.person("Jane Smith", mail="jane.smith@example.test", sam="jsmith")

    client, _ = _login(typed, PASSWORD)

    assert _logged_in_as(client) is None
    assert not User.objects.filter(username__endswith="smith@example.test").exists()


def _generic_page(response) -> bytes:
    return re.sub(rb'name="csrfmiddlewaretoken" value="[^"]*"', b"", response.content)


def test_a_wrong_sync_password_fails_closed_with_the_generic_message_for_any_password(
        settings, people):
    settings.LDAP_BIND_PASSWORD = "not the sync password"

    right_client, right = _login("alice@example.test", PASSWORD)
    _, wrong = _login("alice@example.test", "wrong password")

    assert right.status_code == wrong.status_code == 200
    assert b"not right" in right.content
    assert _generic_page(right) == _generic_page(wrong)
    assert _logged_in_as(right_client) is None
    assert authenticate(username="alice@example.test", password=PASSWORD) is None


def test_a_stopped_directory_fails_the_login_closed_without_a_local_fallback(
        settings, people, tmp_path):
    (tmp_path / "slapd").mkdir()
    server = start_slapd(tmp_path / "slapd")
    try:
        ou = server.new_ou()
        server.add(f"cn=Frank,{ou}", person("Frank", mail="frank@example.test"))
        settings.LDAP_SERVER = server.ldaps_url
        # Stopping the server removes its directory, CA included: keep a copy.
        ca_file = tmp_path / "ca.pem"
        ca_file.write_bytes(server.ca_file.read_bytes())
        settings.LDAP_CA_FILE = str(ca_file)
        settings.LDAP_BASE_DN = [ou]
        running, _ = _login("frank@example.test", PASSWORD)
        assert _logged_in_as(running) == "frank@example.test"
        # A local password on a directory user must not become a way in while the
        # directory is down.
        user = User.objects.get(username="frank@example.test")
        user.set_password("a local password 123")
        user.save()
    finally:
        server.stop()

    stopped_client, stopped = _login("frank@example.test", PASSWORD)
    local_client, local = _login("frank@example.test", "a local password 123")

    assert stopped.status_code == local.status_code == 200
    assert b"not right" in stopped.content
    assert _generic_page(stopped) == _generic_page(local)
    assert _logged_in_as(stopped_client) is None
    assert _logged_in_as(local_client) is None


def _session_store():
    return import_module(django_settings.SESSION_ENGINE).SessionStore


def test_logging_in_replaces_a_session_key_set_beforehand(people):
    planted = _session_store()()
    planted["planted"] = True
    planted.create()
    client = Client()
    client.cookies[django_settings.SESSION_COOKIE_NAME] = planted.session_key
    client.get("/login/")
    csrf_before = client.cookies[django_settings.CSRF_COOKIE_NAME].value

    response = client.post("/login/", {"username": "alice@example.test", "password": PASSWORD})

    assert _logged_in_as(client) == "alice@example.test"
    assert client.session.session_key != planted.session_key
    assert not _session_store()().exists(planted.session_key)
    assert response.cookies[django_settings.CSRF_COOKIE_NAME].value != csrf_before


def test_logging_out_ends_the_session_on_the_server(people):
    client, _ = _login("alice@example.test", PASSWORD)
    key = client.session.session_key
    assert client.get("/").status_code == 200

    client.post("/logout/")
    replay = Client()
    replay.cookies[django_settings.SESSION_COOKIE_NAME] = key
    response = replay.get("/")

    assert not _session_store()().exists(key)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")
