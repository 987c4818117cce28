"""Edges of the relay map on a disk that fills up, with Debian's real postmap.

The database Postfix reads is copied aside as `<map>.db.previous` before it is replaced
(a copy, not a link, so that smtpd notices the change). That copy needs as much room as
the database itself: a disk with room for the new map but not for the copy must still get
the new map (an address just added would otherwise be refused as unknown), and must never
be left with a partial copy that a manual rollback would take for the previous database.

Needs root (mount).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from directory.relaymap import write_relay_map
from tests.directory.conftest import postmap_query
from tests.directory.test_relaymap import _give
from tests.quarantine.test_disk_faults_edges import tmpfs

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
]

PAGE = 4096


def _pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


def _leave_free(directory: Path, free: int) -> None:
    """Take all the room of `directory`'s filesystem but `free` bytes."""
    st = os.statvfs(directory)
    available = st.f_bavail * st.f_frsize
    assert available > free
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, available - free)
    finally:
        os.close(fd)


def test_a_disk_without_room_for_the_copy_of_the_old_database_still_gets_the_new_map(
    relay_map,
):
    with tmpfs(relay_map.parent, size="1m"):
        _give("staff", *(f"user{n}@example.test" for n in range(50)))
        write_relay_map()
        database = Path(f"{relay_map}.db")
        old = database.read_bytes()
        _give("carol", "carol@example.test")
        # Room for the new text and database, with a page to spare: not for a copy of
        # the old database besides them.
        _leave_free(relay_map.parent,
                    _pages(relay_map.stat().st_size + 40) + _pages(len(old)) + PAGE)

        write_relay_map()

        assert postmap_query("carol@example.test", relay_map).stdout.strip() == "OK"
        assert "carol@example.test OK" in relay_map.read_text()
        previous = Path(f"{database}.previous")
        assert not previous.exists() or previous.read_bytes() == old
        leftovers = [p.name for p in relay_map.parent.iterdir()
                     if p.name.startswith(".") or p.name.endswith(".tmp")]
        assert leftovers == []
