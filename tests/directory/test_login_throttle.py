"""Log-in throttling at /login/: per account name, per client address, in the database."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import F
from django.test import Client

from directory.models import LoginFailure
from directory.throttle import start_attempt
from tests.conftest import PASSWORD
from tests.directory.slapd import PASSWORD as DIRECTORY_PASSWORD

REFUSED = b"Too many failed log-in attempts. Try again in 15 minutes."


def _post(username: str, password: str, *, ip: str = "192.0.2.1", client: Client | None = None):
    client = client or Client(REMOTE_ADDR=ip)
    return client.post("/login/", {"username": username, "password": password},
                       REMOTE_ADDR=ip)


def _logged_in(response) -> bool:
    return response.status_code == 302 and "_auth_user_id" in response.client.session


def test_the_eleventh_wrong_password_for_one_account_is_refused_with_429(world):
    statuses = [_post("alice", f"guess {i}").status_code for i in range(10)]
    response = _post("alice", "guess 10")

    assert statuses == [200] * 10
    assert response.status_code == 429
    assert REFUSED in response.content
    assert b"not right" not in response.content


def test_a_throttled_account_is_refused_even_with_the_right_password(world):
    for i in range(10):
        _post("alice", f"guess {i}")

    response = _post("alice", PASSWORD)

    assert response.status_code == 429
    assert not _logged_in(response)


def test_200_guesses_from_200_addresses_reach_the_password_check_only_10_times(world):
    statuses = [_post("alice", f"guess {i}", ip=f"10.0.{i // 250}.{i % 250 + 1}").status_code
                for i in range(200)]

    assert statuses.count(200) == 10
    assert statuses.count(429) == 190


def test_the_limit_holds_for_fresh_sessions_from_the_same_address(world):
    client = Client()
    for i in range(10):
        _post("alice", f"guess {i}", client=client)

    assert _post("alice", "guess", client=Client()).status_code == 429


@pytest.mark.parametrize("typed", ["ALICE", "  Alice ", "alice"])
def test_the_account_name_is_compared_trimmed_and_without_regard_to_case(world, typed):
    for i in range(10):
        _post("Alice", f"guess {i}")

    assert _post(typed, "guess").status_code == 429


def test_other_accounts_are_not_throttled_by_guesses_at_one(world):
    for i in range(10):
        _post("alice", f"guess {i}", ip=f"192.0.2.{i + 1}")

    response = _post("bob", PASSWORD, ip="192.0.2.100")

    assert _logged_in(response)


def test_one_address_trying_many_accounts_is_refused_after_the_address_limit(world):
    statuses = [_post(f"nobody{i}", "guess", ip="198.51.100.7").status_code for i in range(50)]

    from_that_address = _post("bob", PASSWORD, ip="198.51.100.7")
    from_elsewhere = _post("bob", PASSWORD, ip="198.51.100.8")

    assert statuses == [200] * 50
    assert from_that_address.status_code == 429
    assert REFUSED in from_that_address.content
    assert _logged_in(from_elsewhere)


def test_a_success_clears_the_accounts_failures(world):
    for i in range(9):
        _post("alice", f"guess {i}")
    assert _logged_in(_post("alice", PASSWORD))

    statuses = [_post("alice", f"again {i}").status_code for i in range(11)]

    assert statuses == [200] * 10 + [429]


def test_failures_older_than_the_lockout_window_no_longer_count(world):
    for i in range(10):
        _post("alice", f"guess {i}")
    LoginFailure.objects.update(at=F("at") - timedelta(minutes=15, seconds=1))

    assert _logged_in(_post("alice", PASSWORD))


def test_failures_older_than_the_lockout_window_are_pruned(world):
    for i in range(5):
        _post("bob", f"guess {i}")
    LoginFailure.objects.update(at=F("at") - timedelta(minutes=16))

    _post("alice", "guess")

    assert LoginFailure.objects.count() == 1


def test_the_retry_time_counts_from_the_oldest_counted_failure(world):
    for i in range(10):
        _post("alice", f"guess {i}")
    LoginFailure.objects.update(at=F("at") - timedelta(minutes=10, seconds=30))

    response = _post("alice", "guess")

    assert response.status_code == 429
    assert b"Try again in 5 minutes." in response.content


def test_the_limits_and_the_window_come_from_settings(settings, world):
    settings.LOGIN_FAILURE_LIMIT = 3
    settings.LOGIN_IP_FAILURE_LIMIT = 5
    settings.LOGIN_LOCKOUT_MINUTES = 1

    account = [_post("alice", f"guess {i}", ip=f"192.0.2.{i + 1}").status_code
               for i in range(4)]
    address = [_post(f"nobody{i}", "guess", ip="198.51.100.7").status_code for i in range(6)]
    refused = _post("alice", "guess")

    assert account == [200, 200, 200, 429]
    assert address == [200] * 5 + [429]
    assert b"Try again in 1 minute." in refused.content


def test_a_missing_password_is_not_counted(world):
    for _ in range(20):
        Client().post("/login/", {"username": "alice", "password": ""})

    assert LoginFailure.objects.count() == 0
    assert _logged_in(_post("alice", PASSWORD))


def test_the_table_keeps_a_hash_of_the_typed_name_not_the_name(world):
    _post("my secret password typed as name", "guess")

    row = LoginFailure.objects.get()
    assert "secret" not in row.account
    assert len(row.account) == 64
    assert row.ip == "192.0.2.1"


def test_behind_a_proxy_the_address_is_the_last_forwarded_one(settings, world):
    settings.BEHIND_PROXY = True
    for i in range(50):
        Client().post("/login/", {"username": f"nobody{i}", "password": "guess"},
                      REMOTE_ADDR="10.0.0.1",
                      HTTP_X_FORWARDED_FOR=f"203.0.113.{i}, 198.51.100.7")

    refused = Client().post("/login/", {"username": "bob", "password": PASSWORD},
                            REMOTE_ADDR="10.0.0.1",
                            HTTP_X_FORWARDED_FOR="203.0.113.200, 198.51.100.7")
    other = Client().post("/login/", {"username": "bob", "password": PASSWORD},
                          REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR="198.51.100.8")

    assert refused.status_code == 429
    assert _logged_in(other)


@pytest.mark.django_db(transaction=True)
def test_concurrent_attempts_from_separate_connections_never_exceed_the_limit(settings):
    settings.LOGIN_FAILURE_LIMIT = 5
    start = threading.Barrier(20)

    def attempt(i: int) -> bool:
        try:
            start.wait()
            return not start_attempt("alice", f"192.0.2.{i + 1}").refused
        finally:
            connection.close()

    with ThreadPoolExecutor(20) as pool:
        allowed = list(pool.map(attempt, range(20)))

    assert 1 <= sum(allowed) <= 5
    assert LoginFailure.objects.count() == sum(allowed)


@pytest.mark.slapd
def test_a_throttled_directory_login_makes_no_bind_at_all(settings, directory, db):
    settings.LOGIN_METHOD = "ldap"
    settings.AUTHENTICATION_BACKENDS = [
        "directory.auth.LocalAccountBackend",
        "directory.auth.DirectoryBackend",
    ]
    directory.person("Carol", mail="carol@example.test")
    slapd = directory.slapd

    binds_per_attempt = []
    for i in range(10):
        before = len(slapd.binds())
        assert _post("carol@example.test", f"guess {i}").status_code == 200
        time.sleep(0.05)
        binds_per_attempt.append(len(slapd.binds()) - before)
    before = len(slapd.binds())
    wrong = _post("carol@example.test", "guess 10")
    right = _post("carol@example.test", DIRECTORY_PASSWORD)
    time.sleep(0.05)

    assert all(count >= 2 for count in binds_per_attempt)  # the sync account, then Carol
    assert wrong.status_code == right.status_code == 429
    assert REFUSED in right.content
    assert not _logged_in(right)
    assert len(slapd.binds()) == before
