"""Username enumeration at /login/: an unknown name and a wrong password look the same."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.hashers import MD5PasswordHasher
from django.test import Client

from tests.conftest import PASSWORD
from tests.directory.slapd import PASSWORD as DIRECTORY_PASSWORD

CSRF_TOKEN = re.compile(rb'name="csrfmiddlewaretoken" value="[^"]*"')


class CountingHasher(MD5PasswordHasher):
    """The test suite's fast hasher, counting how often a password is hashed."""

    algorithm = "counting_md5"
    calls = 0

    def encode(self, password, salt):
        type(self).calls += 1
        return super().encode(password, salt)


@pytest.fixture
def counting_hasher(settings):
    settings.PASSWORD_HASHERS = ["tests.directory.test_login_enumeration.CountingHasher"]
    CountingHasher.calls = 0
    return CountingHasher


def _page(username: str, password: str) -> tuple[int, bytes]:
    """Status and body of a log-in attempt, with the per-response CSRF token blanked."""
    response = Client().post("/login/", {"username": username, "password": password})
    return response.status_code, CSRF_TOKEN.sub(b'name="csrfmiddlewaretoken" value=""',
                                                response.content)


def _hashes(counting_hasher, username: str, password: str) -> int:
    before = counting_hasher.calls
    _page(username, password)
    return counting_hasher.calls - before


def test_an_unknown_name_and_a_wrong_password_give_the_same_page(world):
    unknown = _page("nobody", "some password")
    wrong = _page("alice", "some password")

    assert unknown == wrong
    assert unknown[0] == 200
    assert b"not right" in unknown[1]


def test_a_disabled_account_with_its_right_password_gives_the_same_page(world):
    world.bob.is_active = False
    world.bob.save()

    assert _page("bob", PASSWORD) == _page("nobody", PASSWORD)


def test_an_unknown_name_runs_the_password_hasher_as_a_wrong_password_does(
        world, counting_hasher):
    # Made after the world so that its users' passwords use the counting hasher too.
    world.alice.set_password("alice's password")
    world.alice.save()

    unknown = _hashes(counting_hasher, "nobody", "some password")
    wrong = _hashes(counting_hasher, "alice", "some password")

    assert unknown == wrong >= 1


def test_a_throttled_unknown_name_and_a_throttled_user_give_the_same_page(world):
    for i in range(10):
        _page("nobody", f"guess {i}")
        _page("alice", f"guess {i}")

    unknown = _page("nobody", "guess")
    known = _page("alice", "guess")

    assert unknown == known
    assert unknown[0] == 429


@pytest.fixture
def ldap_login(settings, directory):
    settings.LOGIN_METHOD = "ldap"
    settings.AUTHENTICATION_BACKENDS = [
        "directory.auth.LocalAccountBackend",
        "directory.auth.DirectoryBackend",
    ]
    directory.person("Dora", mail="dora@example.test", sam="dora")
    directory.person("Eve Left", mail="eve@example.test", disabled=True)
    return directory


@pytest.mark.slapd
@pytest.mark.django_db
def test_an_unknown_address_and_a_wrong_directory_password_give_the_same_page(ldap_login):
    unknown = _page("nobody@example.test", "some password")
    wrong = _page("dora@example.test", "some password")
    disabled = _page("eve@example.test", DIRECTORY_PASSWORD)

    assert unknown == wrong == disabled
    assert unknown[0] == 200


@pytest.mark.slapd
@pytest.mark.django_db
def test_an_unknown_address_runs_the_password_hasher_as_a_known_person_does(
        ldap_login, counting_hasher):
    # Dora logs in once so that she has a viewer user (with no usable local password).
    assert _page("dora@example.test", DIRECTORY_PASSWORD)[0] == 302

    unknown = _hashes(counting_hasher, "nobody@example.test", "some password")
    wrong = _hashes(counting_hasher, "dora@example.test", "some password")

    assert unknown == wrong >= 1
