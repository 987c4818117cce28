"""The quarantine store on a filesystem that fails for real, behind a real worker.

"Nothing lost": a quarantined message is acknowledged only once its file is durably written
and its rows committed; any failure is a 4xx and the client sends it again. These tests put
QUARANTINE_DIR on small filesystems mounted for the test (a tmpfs with few pages or few
inodes for ENOSPC at write, mkdir, open and link; ext4 on a loop device whose backing file
has nowhere to grow for ENOSPC at fsync; read-only remounts and immutable directories),
make the index insert fail (the database down, the table locked past the worker's time
limit), and check each time that the client hears 451, that nothing is left behind that
holds the space or that the indexer would make into a second copy, that the worker goes on
serving, and that the retried message is stored exactly once.

Needs root (mount, losetup, chattr).
"""

from __future__ import annotations

import contextlib
import os
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.urls import reverse

from quarantine.indexer import index_directory
from quarantine.models import Message, Recipient
from quarantine.sink import DjangoQuarantineSink
from quarantine.store import FileStore
from tests.conftest import build_mail
from tests.e2e.postfix import wait_until
from tests.mailfilter.conftest import (  # noqa: F401 - fixtures
    QuarantineEverything,
    next_hop,
    raw,
    start_filter,
)
from tests.mailfilter.daemons import eicar
from tests.mailfilter.processes import start_runfilter, stop_process

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


# Filesystems ---------------------------------------------------------------------------


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def _unmount(path: Path) -> None:
    try:
        _run("umount", str(path))
    except subprocess.CalledProcessError:
        # A file still open somewhere: detach it now, the kernel frees it once closed.
        _run("umount", "-l", str(path))


@contextlib.contextmanager
def tmpfs(path: Path, **options: str | int) -> Iterator[Path]:
    """A tmpfs mounted at `path` (made if missing) with `size`, `nr_inodes`..., unmounted
    at the end."""
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", ",".join(f"{k}={v}" for k, v in options.items()),
         "tmpfs", str(path))
    try:
        yield path
    finally:
        _unmount(path)


def remount(path: Path, *options: str) -> None:
    _run("mount", "-o", ",".join(("remount", *options)), str(path))


@contextlib.contextmanager
def ext4(path: Path, image: Path, *, size: str = "16M", fresh: bool = True) -> Iterator[Path]:
    """An ext4 (no reserved blocks) in a sparse image file, loop-mounted at `path`; made
    anew unless `fresh` is false."""
    path.mkdir(parents=True, exist_ok=True)
    if fresh:
        _run("truncate", "-s", size, str(image))
        _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    _run("mount", "-o", "loop", str(image), str(path))
    try:
        yield path
    finally:
        _unmount(path)


def fill(directory: Path) -> Path:
    """A file that takes every free block of `directory`'s filesystem."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = 1024 * 1024
        while size:
            try:
                written = os.write(fd, b"\0" * size)
            except OSError:
                written = 0
            if written < size:
                size //= 2
        os.fsync(fd)
    finally:
        os.close(fd)
    return filler


def store_files(root: Path) -> list[str]:
    """Every file under the store, temporary ones included (not ext4's lost+found)."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*")
        if not p.is_dir() and "lost+found" not in p.parts and p.name != "filler"
    )


# The worker ------------------------------------------------------------------------------


def mail(subject: str, *, body_bytes: int = 0) -> bytes:
    body = "Hello there.\n"
    if body_bytes:
        # Text that does not compress away: each line different.
        body = "".join(f"{n:08d} {os.urandom(30).hex()}\n" for n in range(body_bytes // 70))
    return build_mail(subject=subject, body=body)


def send(port: int, message: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("sender@remote.example")
        client.rcpt("alice@example.test")
        return client.data(message)


@pytest.fixture
def quarantining_worker(start_filter):  # noqa: F811 - the fixture imported above
    """A worker that holds every message as VIRUS (an uncompressed file, so that its size
    on disk is the message's) with the Django sink into `root`."""

    def start(root: Path, *, subdir_levels: int = 1, **config):
        return start_filter(
            sink=DjangoQuarantineSink(FileStore(root, subdir_levels=subdir_levels)),
            policy=QuarantineEverything(destiny="discard", category="VIRUS",
                                        reasons=("Eicar-Test-Signature",)),
            **config,
        )

    return start


def assert_stored_once(root: Path, subjects: list[str]) -> None:
    """One file and one indexed message per subject, and an index run finds nothing more."""
    assert sorted(Message.objects.values_list("subject", flat=True)) == sorted(subjects)
    files = store_files(root)
    assert len(files) == len(subjects), files
    assert sorted(Message.objects.values_list("storage_key", flat=True)) == files
    summary = index_directory(root)
    assert (summary.new, summary.removed) == (0, 0), summary
    assert Message.objects.count() == len(subjects)


# ENOSPC ----------------------------------------------------------------------------------


def test_message_larger_than_the_free_space_leaves_no_partial_file_holding_it(
    transactional_db, quarantining_worker, tmp_path
):
    """A write that fails half-way must give its blocks back: otherwise the next, smaller
    message finds the disk full too, and every retry of the big one fills it again."""
    with tmpfs(tmp_path / "q", size="256k") as root:
        worker = quarantining_worker(root)
        big = mail("big", body_bytes=600 * 1024)
        code, text = send(worker.port, big)
        assert code == 451, text
        assert store_files(root) == []

        code, text = send(worker.port, mail("small"))
        assert code == 250, text

        remount(root, "size=4m")
        code, text = send(worker.port, big)
        assert code == 250, text
        assert_stored_once(root, ["big", "small"])
        assert worker.stat("messages_tempfailed", "quarantine") == 1


def test_enospc_at_fsync_answers_451_and_leaves_nothing_the_indexer_would_take(
    transactional_db, quarantining_worker, tmp_path, raw  # noqa: F811
):
    """ext4 accepts the write into its cache; the fsync finds the device full (a loop device
    over a file on a full tmpfs, as a thin-provisioned volume does). ext4 then stops its
    journal and turns read-only, so the next message is refused too; after the disk is given
    space and checked, the retry is stored once and nothing of the failed write is indexed."""
    backing = tmp_path / "backing"
    image = backing / "image"
    with tmpfs(backing, size="1m"):
        with ext4(tmp_path / "q", image) as root:
            worker = quarantining_worker(root)
            waiting = raw(worker.port)
            waiting.reply()
            assert waiting.command(b"EHLO other.test")[:3] == b"250"

            message = mail("fsync", body_bytes=2 * 1024 * 1024)
            code, text = send(worker.port, message)
            assert code == 451, text
            assert store_files(root) == []
            # The worker still serves the session that was open and new ones.
            assert waiting.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
            assert waiting.command(b"RSET")[:3] == b"250"
            code, _ = send(worker.port, mail("meanwhile"))
            assert code == 451
            assert Message.objects.count() == 0

        remount(backing, "size=32m")
        # e2fsck repairs what the aborted journal left (exit 1: errors corrected).
        fsck = subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, text=True)
        assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
        with ext4(tmp_path / "q", image, fresh=False) as root:
            assert [f for f in store_files(root) if not f.split("/")[-1].startswith(".")] == []
            summary = index_directory(root)
            assert summary.new == 0
            worker = quarantining_worker(root)
            code, text = send(worker.port, message)
            assert code == 250, text
            assert Message.objects.get().subject == "fsync"


def test_full_disk_at_mkdir_of_a_sub_directory_answers_451_then_stores_the_retry_once(
    transactional_db, quarantining_worker, tmp_path
):
    with ext4(tmp_path / "q", tmp_path / "image") as root:
        filler = fill(root)
        worker = quarantining_worker(root)
        message = mail("mkdir")
        code, text = send(worker.port, message)
        assert code == 451, text
        assert store_files(root) == []
        assert sorted(p.name for p in root.iterdir()) == ["filler", "lost+found"]

        filler.unlink()
        code, text = send(worker.port, message)
        assert code == 250, text
        assert_stored_once(root, ["mkdir"])


@pytest.mark.parametrize(
    ("subdir_levels", "nr_inodes", "step"),
    [(1, 1, "mkdir"), (0, 1, "open"), (0, 2, "link")],
)
def test_no_inode_left_answers_451_then_stores_the_retry_once(
    transactional_db, quarantining_worker, tmp_path, subdir_levels, nr_inodes, step
):
    """tmpfs counts an inode for the directory, for the temporary file and for the link
    that gives it its final name: with one or two inodes the write fails at each step."""
    with tmpfs(tmp_path / "q", size="1m", nr_inodes=nr_inodes) as root:
        worker = quarantining_worker(root, subdir_levels=subdir_levels)
        message = mail(f"inodes at {step}")
        code, text = send(worker.port, message)
        assert code == 451, text
        assert store_files(root) == []

        remount(root, "nr_inodes=64")
        code, text = send(worker.port, message)
        assert code == 250, text
        assert_stored_once(root, [f"inodes at {step}"])


@pytest.mark.parametrize("how", ["read-only remount", "immutable directory"])
def test_store_that_turns_read_only_under_the_worker_answers_451_then_stores_the_retry_once(
    transactional_db, quarantining_worker, tmp_path, how
):
    with ext4(tmp_path / "q", tmp_path / "image") as root:
        worker = quarantining_worker(root, subdir_levels=0)
        assert send(worker.port, mail("before"))[0] == 250
        if how == "read-only remount":
            remount(root, "ro")
        else:
            _run("chattr", "+i", str(root))
        try:
            message = mail("while read-only")
            code, text = send(worker.port, message)
            assert code == 451, text
            assert Message.objects.count() == 1
        finally:
            if how == "read-only remount":
                remount(root, "rw")
            else:
                _run("chattr", "-i", str(root))
        code, text = send(worker.port, message)
        assert code == 250, text
        assert_stored_once(root, ["before", "while read-only"])


# The index insert fails --------------------------------------------------------------------


def other_sessions() -> int:
    """Connections to the test database besides this thread's own: the sink's, while a
    write is under way (it closes its connection when it is done)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def test_index_insert_held_past_the_time_limit_leaves_no_copy_beside_the_retry(
    transactional_db, quarantining_worker, tmp_path
):
    """The table is locked by another transaction for longer than the worker waits: the
    client hears 451 and sends the message again. The write the worker gave up on must not
    complete once the lock goes, or the viewer shows the message twice."""
    root = tmp_path / "q"
    root.mkdir()
    worker = quarantining_worker(root, relay_data_timeout=1)
    message = mail("locked")
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(f"LOCK TABLE {Message._meta.db_table} IN EXCLUSIVE MODE")
        code, text = send(worker.port, message)
        assert code == 451, text
        # The insert given up on is cancelled at once: its file goes while the lock is held.
        assert wait_until(lambda: store_files(root) == [], timeout=10), store_files(root)
    # Once the lock is gone nothing of the write given up on may be committed.
    assert wait_until(lambda: other_sessions() == 0, timeout=20)
    assert Message.objects.count() == 0
    assert store_files(root) == []

    code, text = send(worker.port, message)
    assert code == 250, text
    assert wait_until(lambda: other_sessions() == 0, timeout=20)
    assert_stored_once(root, ["locked"])


def test_database_down_answers_451_and_removes_the_file_it_wrote(
    transactional_db, tmp_path, next_hop, closed_port, monkeypatch  # noqa: F811
):
    """`runfilter` with DATABASE_URL on a port nobody listens on: the file is written, the
    insert fails, the file goes. The retry, once the database is back, is stored once."""
    root = tmp_path / "q"
    root.mkdir()
    message = build_mail(subject="database down") + eicar() + b"\n"
    env = {"FILTER_NEXT_HOP": f"127.0.0.1:{next_hop.port}", "QUARANTINE_DIR": str(root)}
    name = connection.settings_dict["NAME"]
    for url, expected in (
        (f"postgresql://postgres@127.0.0.1:{closed_port}/{name}", 451),
        (f"postgresql://postgres@127.0.0.1:{connection.settings_dict['PORT'] or 5432}/{name}",
         554),
    ):
        # start_runfilter hands the test run's DATABASE_URL on.
        monkeypatch.setenv("DATABASE_URL", url)
        process = start_runfilter(env)
        try:
            line = process.stdout.readline()
            assert "filter listening on" in line, line + process.stderr.read()
            port = int(line.split(",")[0].rsplit(":", 1)[1])
            code, text = send(port, message)
        finally:
            stop_process(process)
            process.stdout.close()
            log = process.stderr.read()
            process.stderr.close()
        assert code == expected, (text, log[-3000:])
        if expected == 451:
            # The message reached the sink and its file was written (the store raised
            # nothing): what failed is the database.
            assert "quarantine failed" in log and "OperationalError" in log, log[-3000:]
            assert "StoreError" not in log, log[-3000:]
            assert store_files(root) == []
            assert Message.objects.count() == 0
    assert_stored_once(root, ["database down"])
    assert next_hop.deliveries == []


# Reading a file whose disk is gone --------------------------------------------------------


@contextlib.contextmanager
def failing_disk(path: Path, image: Path) -> Iterator[Callable[[Path], None]]:
    """ext4 on a loop device, mounted at `path`. Calling the yielded function with a file
    makes the disk lose the blocks from that file's first one on: the device shrinks to end
    before them, and a read of the file fails with EIO as on a dead disk."""
    path.mkdir(parents=True, exist_ok=True)
    _run("truncate", "-s", "16M", str(image))
    _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        _run("mount", loop, str(path))

        def fail(victim: Path) -> None:
            _run("sync")
            extents = subprocess.run(["filefrag", "-v", "-b1", str(victim)], check=True,
                                     capture_output=True, text=True).stdout
            # "   0:        0..  300031:    1200128..   1500159: ..." (bytes)
            first = next(line for line in extents.splitlines() if line.strip().startswith("0:"))
            offset = int(first.split(":")[2].split("..")[0])
            os.truncate(image, offset)
            _run("losetup", "-c", loop)
            # The pages still cached would answer without the disk.
            fd = os.open(victim, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

        try:
            yield fail
        finally:
            _unmount(path)
    finally:
        _run("losetup", "-d", loop)


@pytest.mark.parametrize("how", ["disk fails", "unmounted"])
def test_download_detail_and_release_of_a_file_on_a_dead_disk_answer_without_a_500(
    client, world, make_message, settings, smtp_sink, tmp_path, how
):
    with failing_disk(tmp_path / "q", tmp_path / "image") as fail:
        settings.QUARANTINE_DIR = tmp_path / "q"
        message = make_message(category="SPAM", subject="on a dead disk")
        path = tmp_path / "q" / message.storage_key
        if how == "disk fails":
            fail(path)
        else:
            _run("umount", "-l", str(tmp_path / "q"))
            _run("mount", "-t", "tmpfs", "tmpfs", str(tmp_path / "q"))
        client.force_login(world.alice)

        response = client.get(reverse("quarantine:download", args=[message.mail_id]))
        assert response.status_code == 404

        response = client.get(reverse("quarantine:detail", args=[message.mail_id]))
        assert response.status_code == 200
        assert "on a dead disk" in response.content.decode()

        response = client.post(reverse("quarantine:release", args=[message.mail_id]),
                               follow=True)
        assert response.status_code == 200
        assert [str(m) for m in response.context["messages"]] == [
            "Release failed: the stored message cannot be read."
        ]
        assert smtp_sink.received == []
        assert Recipient.objects.get(message=message).released_at is None
