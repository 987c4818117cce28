"""The Postfix relay map writer, checked with Debian's real postmap."""

from __future__ import annotations

import fcntl
import io
import re
import threading
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError

from directory.models import Address
from directory.relaymap import (
    PostmapFailed,
    RelayMapBusy,
    RelayMapShrinkRefused,
    map_key,
    write_address_file,
    write_relay_map,
)
from tests.directory.conftest import postmap_query, unsupported_postmap_type

pytestmark = pytest.mark.django_db

LINE = re.compile(r"[a-z0-9!$%&'*+/=?^_`{|}~.-]+@[a-z0-9.-]+ OK")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _give(username: str, *addresses: str) -> User:
    user, _ = User.objects.get_or_create(username=username)
    for address in addresses:
        Address.objects.create(user=user, address=address, source=Address.SOURCE_LOCAL)
    return user


def test_map_lists_every_address_once_lower_cased_and_sorted(settings, relay_map, tmp_path):
    _give("alice", "Alice@Example.test", "alice.alias@example.test")
    _give("bob", "bob@example.test")
    write_address_file(settings.RELAY_MAP_DIRECTORY_EXTRA,
                       ["sales@example.test", "bob@example.test"])
    static = tmp_path / "extra"
    static.write_text("# kept by hand\n\n@legacy.example  OK\npostmaster@example.test\n")
    settings.RELAY_MAP_EXTRA = str(static)

    result = write_relay_map()

    assert _lines(relay_map) == [
        "@legacy.example OK",
        "alice.alias@example.test OK",
        "alice@example.test OK",
        "bob@example.test OK",
        "postmaster@example.test OK",
        "sales@example.test OK",
    ]
    assert result.count == 6
    assert result.previous_count == 0


def test_hostile_values_never_become_keys_and_are_logged(settings, relay_map, caplog):
    user = _give("alice", "alice@example.test")
    # Rows written around Address.save(), as a bulk import or an old database might hold.
    Address.objects.bulk_create([
        Address(user=user, address=" lead@example.test"),
        Address(user=user, address="two words@example.test"),
    ])
    hostile = [
        "hash#tag@example.test",
        "#comment@example.test",
        "cr\r@example.test",
        "lf\n@example.test",
        "line\nevil@example.test OK",
        '"quoted"@example.test',
        "@catchall.example",
        "tab\t@example.test",
        "nul\x00@example.test",
        "ünïcode@example.test",
        "x" * 10_000 + "@example.test",
        "smtp:prefixed@example.test",
        "no-at-sign",
        "two@@example.test",
        "dot.@example.test",
        "trailing@example.test.",
        "good.contact@Example.TEST",
    ]

    result = write_relay_map(directory_extra=hostile)

    lines = _lines(relay_map)
    assert lines == ["alice@example.test OK", "good.contact@example.test OK"]
    assert all(LINE.fullmatch(line) for line in lines)
    assert len(result.rejected) == len(hostile) - 1 + 2
    assert "left out an invalid address" in caplog.text


@pytest.mark.parametrize(
    "value",
    ["a b@example.test", "#a@example.test", " a@example.test", "a@example.test\n",
     "a\r@example.test", "@example.test", "a@-bad.example", "a@example"],
)
def test_map_key_refuses_values_that_could_break_the_source_format(value):
    assert map_key(value) is None


def test_postmap_builds_the_database_postfix_reads(relay_map):
    _give("alice", "alice@example.test")

    write_relay_map()

    assert Path(f"{relay_map}.db").exists()
    assert postmap_query("alice@example.test", relay_map).stdout.strip() == "OK"
    assert postmap_query("nobody@example.test", relay_map).returncode == 1


def test_map_without_postmap_is_plain_text_for_texthash(settings, relay_map):
    settings.RELAY_MAP_POSTMAP = "texthash"
    _give("alice", "alice@example.test")

    write_relay_map()

    assert _lines(relay_map) == ["alice@example.test OK"]
    assert not Path(f"{relay_map}.db").exists()


def test_postmap_failure_keeps_the_previous_map_and_database(settings, relay_map):
    _give("alice", "alice@example.test")
    write_relay_map()
    old_text = relay_map.read_bytes()
    old_db = Path(f"{relay_map}.db").read_bytes()
    _give("bob", "bob@example.test")
    settings.RELAY_MAP_POSTMAP = unsupported_postmap_type()

    with pytest.raises(PostmapFailed, match="previous map is kept"):
        write_relay_map()

    assert relay_map.read_bytes() == old_text
    assert Path(f"{relay_map}.db").read_bytes() == old_db
    assert sorted(p.name for p in relay_map.parent.iterdir()) == [
        "relay_recipients", "relay_recipients.db", "relay_recipients.lock"]


def test_postmap_runs_without_a_shell_even_for_odd_paths(settings, tmp_path):
    odd = tmp_path / "maps; touch pwned $(touch pwned2)"
    odd.mkdir()
    settings.RELAY_MAP_PATH = odd / "relay recipients"
    _give("alice", "alice@example.test")

    write_relay_map()

    assert postmap_query("alice@example.test", settings.RELAY_MAP_PATH).stdout.strip() == "OK"
    assert not any(p.name.startswith("pwned") for p in Path.cwd().iterdir())
    assert not any(p.name.startswith("pwned") for p in tmp_path.rglob("*"))


def test_replacing_the_map_keeps_the_previous_version_and_is_world_readable(relay_map):
    _give("alice", "alice@example.test")
    write_relay_map()
    first = relay_map.read_text()
    _give("bob", "bob@example.test")

    write_relay_map()

    assert Path(f"{relay_map}.previous").read_text() == first
    assert Path(f"{relay_map}.db.previous").exists()
    assert relay_map.stat().st_mode & 0o777 == 0o644
    assert postmap_query("bob@example.test", relay_map).stdout.strip() == "OK"


def test_readers_only_ever_see_a_complete_map(relay_map):
    _give("alice", "alice@example.test")
    sizes = (300, 200)
    write_relay_map(directory_extra=[f"u{i}@example.test" for i in range(sizes[0])])
    seen: set[int] = set()
    torn: list[int] = []
    done = threading.Event()

    def read_continuously() -> None:
        while not done.is_set():
            text = relay_map.read_text()
            count = text.count("\n")
            seen.add(count)
            if count - 1 not in sizes or not text.endswith("OK\n"):
                torn.append(count)

    reader = threading.Thread(target=read_continuously)
    reader.start()
    try:
        for n in range(20):
            size = sizes[n % 2]
            write_relay_map(directory_extra=[f"u{i}@example.test" for i in range(size)])
    finally:
        done.set()
        reader.join()

    assert torn == []
    assert seen == {301, 201}


def test_an_empty_map_is_refused_and_the_command_names_both_counts(relay_map):
    _give("alice", "a1@example.test", "a2@example.test", "a3@example.test")
    write_relay_map()
    before = relay_map.read_bytes()
    Address.objects.all().delete()

    with pytest.raises(CommandError, match=r"new map has 0 addresses, the current one 3"):
        call_command("writerelaymap")

    assert relay_map.read_bytes() == before


def test_force_replaces_even_with_an_empty_map(relay_map):
    _give("alice", "a1@example.test")
    write_relay_map()
    Address.objects.all().delete()

    call_command("writerelaymap", "--force", stdout=io.StringIO())

    assert relay_map.read_text() == ""


def test_a_first_map_that_would_be_empty_is_refused(relay_map):
    with pytest.raises(RelayMapShrinkRefused):
        write_relay_map()
    assert not relay_map.exists()


def test_shrinking_below_the_ratio_is_refused_but_above_it_accepted(settings, relay_map):
    user = _give("alice", *[f"a{i}@example.test" for i in range(10)])
    write_relay_map()
    Address.objects.filter(user=user, address__in=[f"a{i}@example.test"
                                                   for i in range(6)]).delete()

    with pytest.raises(RelayMapShrinkRefused) as refused:
        write_relay_map()
    assert (refused.value.new_count, refused.value.current_count) == (4, 10)
    assert len(_lines(relay_map)) == 10

    settings.RELAY_MAP_MIN_RATIO = 0.4
    write_relay_map()
    assert len(_lines(relay_map)) == 4


def test_a_second_writer_waits_for_the_lock_and_gives_up(settings, relay_map):
    _give("alice", "alice@example.test")
    write_relay_map()
    before = relay_map.read_bytes()
    _give("bob", "bob@example.test")
    settings.RELAY_MAP_LOCK_TIMEOUT = 0.3

    with open(f"{relay_map}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RelayMapBusy):
            write_relay_map()
        assert relay_map.read_bytes() == before

    write_relay_map()
    assert "bob@example.test OK" in _lines(relay_map)


def test_writerelaymap_reports_what_it_wrote(relay_map, capsys):
    _give("alice", "alice@example.test")

    call_command("writerelaymap")

    assert f"relay map {relay_map}: 1 addresses (was 0)" in capsys.readouterr().out
