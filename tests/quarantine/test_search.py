"""The list's search: what it matches, its two ways of finding rows in PostgreSQL, the
trigram indexes behind it, and their migration on PostgreSQL and SQLite."""

from __future__ import annotations

import importlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import DatabaseError, connection, transaction
from django.urls import reverse

from quarantine import views
from quarantine.models import Message
from tests.conftest import build_mail

ROOT = Path(__file__).resolve().parent.parent.parent
LIST = reverse("quarantine:list")
TRIGRAM_INDEXES = {"message_subject_trgm", "message_from_trgm", "message_to_trgm",
                   "rcpt_address_trgm"}
migration = importlib.import_module("quarantine.migrations.0002_search_trigram_indexes")


def mail_ids(response) -> list[str]:
    assert response.status_code == 200
    return re.findall(r'<tr id="row-([^"]+)"', response.content.decode())


@pytest.fixture(params=["few matches", "many matches"])
def both_ways(request, monkeypatch):
    """Run the test through the candidate look-up and through the newest-first scan."""
    if request.param == "many matches":
        monkeypatch.setattr(views, "SEARCH_CANDIDATE_LIMIT", 0)
    return request.param


@pytest.fixture
def one_hit_per_field(make_message):
    """One message matching only in each searchable field, and one matching in none."""
    return {
        "subject": make_message(subject="Quarterly Invoice 42"),
        "from": make_message(from_="Mallory <mallory@evil.example>"),
        "to": make_message(raw=build_mail(to="Undisclosed <list-xyzzy@lists.example>")),
        "address": make_message(recipients=["alice.alias@example.test"]),
        "none": make_message(subject="Nothing to see"),
    }


SEARCHES = [
    ("subject", "INVOICE 4"),
    ("subject", "qu"),  # too short for the trigram indexes
    ("from", "mallory@EVIL"),
    ("from", "ry@"),
    ("to", "xyzzy"),
    ("to", "LIST-"),
    ("address", "alias@"),
    ("address", ".al"),
]


@pytest.mark.parametrize("field,q", SEARCHES)
def test_search_finds_each_field_for_vadmin(client, world, one_hit_per_field, both_ways,
                                            field, q):
    client.force_login(world.vadmin)

    assert mail_ids(client.get(LIST, {"q": q})) == [one_hit_per_field[field].mail_id]


@pytest.mark.parametrize("field,q", SEARCHES)
def test_search_finds_each_field_for_a_user(client, world, one_hit_per_field, both_ways,
                                            field, q):
    client.force_login(world.alice)

    assert mail_ids(client.get(LIST, {"q": q})) == [one_hit_per_field[field].mail_id]


def test_search_keeps_to_the_users_rows(client, world, make_message, both_ways):
    mine = make_message(recipients=["alice@example.test"], subject="invoice for alice")
    make_message(recipients=["bob@example.test"], subject="invoice for bob")
    shared = make_message(recipients=["alice@example.test", "bob@example.test"],
                          subject="bob@example.test shares this invoice")
    client.force_login(world.alice)

    assert mail_ids(client.get(LIST, {"q": "invoice"})) == [shared.mail_id, mine.mail_id]
    assert mail_ids(client.get(LIST, {"q": "bob@example"})) == [shared.mail_id]
    page = client.get(LIST, {"q": "bob@example"}).content.decode()
    assert 'data-label="Recipient">bob@example.test' not in page


def test_search_with_category_and_vadmins_view_of_a_user(client, world, make_message,
                                                         both_ways):
    spam = make_message(subject="weekly digest", category="SPAM")
    make_message(subject="weekly digest", category="BANNED")
    make_message(subject="weekly digest", recipients=["bob@example.test"], category="SPAM")
    client.force_login(world.vadmin)

    response = client.get(LIST, {"q": "digest", "category": "SPAM", "user": world.alice.id})

    assert mail_ids(response) == [spam.mail_id]


def test_search_pages_cover_every_match_once(client, world, make_message, settings,
                                             both_ways):
    settings.QUARANTINE_PAGE_SIZE = 5
    hits = [make_message(subject=f"match {i} report") for i in range(12)]
    for i in range(6):
        make_message(subject=f"other {i}")
    client.force_login(world.vadmin)

    seen: list[str] = []
    response = client.get(LIST, {"q": "report"})
    while True:
        seen += mail_ids(response)
        match = re.search(r'<a href="\?([^"]+)" id="older">', response.content.decode())
        if not match:
            break
        response = client.get(LIST + "?" + match.group(1).replace("&amp;", "&"))

    assert seen == [m.mail_id for m in reversed(hits)]


def test_a_term_found_nowhere_gives_an_empty_page(client, world, make_message, both_ways):
    make_message()
    client.force_login(world.vadmin)

    response = client.get(LIST, {"q": "zzzznomatch"})

    assert mail_ids(response) == []
    assert 'id="empty"' in response.content.decode()


@pytest.mark.parametrize("q", ["100%", "a_b", "back\\slash", "ÄÖÜ-straße"])
def test_like_wildcards_and_non_ascii_are_matched_literally(client, world, make_message,
                                                            both_ways, q):
    hit = make_message(subject=f"Subject with {q} in it")
    make_message(subject="Subject with 1000 and aXb and backslash and äöü-strasse")
    client.force_login(world.vadmin)

    assert mail_ids(client.get(LIST, {"q": q})) == [hit.mail_id]


@pytest.mark.django_db
def test_postgresql_has_the_trigram_indexes():
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only")
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE indexname LIKE '%%_trgm'")
        names = {row[0] for row in cursor.fetchall()}

    assert names == TRIGRAM_INDEXES


@pytest.mark.django_db
@pytest.mark.parametrize("queryset,index", [
    (lambda: Message.objects.filter(subject__icontains="invoice"), "message_subject_trgm"),
    (lambda: Message.objects.filter(from_header__icontains="mallory"), "message_from_trgm"),
    (lambda: Message.objects.filter(to_header__icontains="xyzzy"), "message_to_trgm"),
    (lambda: views.Recipient.objects.filter(address__icontains="alias"),
     "rcpt_address_trgm"),
])
def test_the_orms_icontains_can_use_the_trigram_indexes(queryset, index):
    """The indexes cover the exact expression Django writes for icontains."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only")
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        plan = queryset().explain()

    assert index in plan


def test_migration_logs_and_goes_on_when_the_extension_cannot_be_created(caplog):
    executed: list[str] = []

    class Cursor:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def execute(self, sql, params=None):
            executed.append(sql)
            if sql.startswith("CREATE EXTENSION"):
                raise DatabaseError("permission denied to create extension \"pg_trgm\"")

        def fetchone(self):
            return None

    class Connection:
        vendor = "postgresql"

        def cursor(self):
            return Cursor()

    class SchemaEditor:
        connection = Connection()

    with caplog.at_level(logging.WARNING, logger="quarantine.migrations"):
        migration.create_trigram_indexes(None, SchemaEditor())

    assert not any("CREATE INDEX" in sql for sql in executed)
    assert "pg_trgm" in caplog.text and "permission denied" in caplog.text


def test_migrations_run_on_sqlite_and_back(tmp_path):
    env = {
        **os.environ,
        "SPAMVIEWER_VAR_DIR": str(tmp_path),
        "SPAMVIEWER_IGNORE_DOTENV": "1",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    manage = [sys.executable, "manage.py"]

    def run(*args: str) -> str:
        done = subprocess.run(manage + list(args), cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("migrate", "--noinput", "-v0")
    assert "[X] 0002_search_trigram_indexes" in run("showmigrations", "quarantine")
    run("migrate", "quarantine", "0001", "--noinput", "-v0")
    assert "[ ] 0002_search_trigram_indexes" in run("showmigrations", "quarantine")


def test_searchindexes_says_the_indexes_are_for_postgresql(tmp_path):
    env = {
        **os.environ,
        "SPAMVIEWER_VAR_DIR": str(tmp_path),
        "SPAMVIEWER_IGNORE_DOTENV": "1",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    done = subprocess.run([sys.executable, "manage.py", "searchindexes"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "the search indexes are for PostgreSQL; this database is sqlite" in done.stderr
