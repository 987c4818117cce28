"""The worker's memory under heavy or hostile but well-formed load.

A real `manage.py runfilter` process is measured from /proc (VmHWM: the most it ever held
resident). The bounds asserted are correctness properties: what one message may make the
worker hold, and that the worker answers 4xx rather than hold more than its DATA budget
(four messages of FILTER_MAX_MESSAGE_SIZE octets at once); timing lives in bench/.
"""

from __future__ import annotations

import base64
import io
import os
import smtplib
import time
import zipfile
from pathlib import Path

import pytest

from mailfilter import archives, mime
from tests.mailfilter.test_reload import write_profiles

HEAD = (
    b"From: a@remote.example\r\nTo: alice@example.test\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <m@remote.example>\r\n"
    b"Subject: memory\r\n"
)


def vm(pid: int, name: str) -> int:
    """VmRSS or VmHWM of `pid`, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) // 1024
    raise AssertionError(f"no {name} for {pid}")


def compressible(size: int) -> bytes:
    """`size` octets that deflate about 50:1: under every ratio limit, far over 1:1."""
    block = os.urandom(1000) + b"\0" * 49_000
    return (block * (size // len(block) + 1))[:size]


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def with_attachments(files: list[tuple[str, bytes]]) -> bytes:
    parts = [b"--BB\r\nContent-Type: text/plain\r\n\r\nsee the files\r\n"]
    for name, data in files:
        parts.append(
            b"--BB\r\nContent-Type: application/zip; name="
            + name.encode()
            + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(data).replace(b"\n", b"\r\n")
        )
    return (
        HEAD
        + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\n"
        + b"".join(parts)
        + b"--BB--\r\n"
    )


# -- archives: one expansion budget per message -------------------------------------------


def test_the_archives_of_one_message_share_its_expansion_limit():
    """max_total_bytes bounds what the archives of a message expand to together: three
    attachments that each stay under it alone do not add up to three times as much."""
    limits = mime.MimeLimits(
        archive_limits=archives.ArchiveLimits(max_total_bytes=5 * 2**20, ratio_floor=2**20)
    )
    archive = zip_of({"data.bin": compressible(3 * 2**20)})
    parsed = mime.parse_message(
        with_attachments([(f"a{i}.zip", archive) for i in range(3)]), limits=limits
    )
    listings = [listing for _, listing in parsed.listings()]
    assert len(listings) == 3
    expanded = sum(member.size for listing in listings for member in listing.members)
    assert expanded <= 5 * 2**20
    problems = [problem for listing in listings for problem in listing.problems]
    # The archive that crossed the limit, and the one after it, which has none left.
    assert [problem.kind for problem in problems] == [archives.BOMB, archives.BOMB]
    assert all("expands beyond 5 MB" in problem.reason for problem in problems)


def test_a_message_of_many_expanding_archives_keeps_the_worker_small(runfilter, tmp_path):
    """Eight attachments, each a zip that expands to 96 MB (four members of 24 MB, each
    kept for the signature scan): the worker must not hold 768 MB for one message. It
    lists 100 MB of them at most and calls the rest a bomb: BANNED, which this profile
    rejects (no quarantine copy: only the worker's memory is looked at)."""
    archive = zip_of({f"m{k}.bin": compressible(24 * 2**20) for k in range(4)})
    message = with_attachments([(f"f{i}.zip", archive) for i in range(8)])
    profiles = tmp_path / "profiles"
    write_profiles(profiles, "virus_scan=1,default.sigs\nbanned_destiny=reject\n")
    worker = runfilter(PROFILE_DIR=str(profiles))
    before = vm(worker.pid, "VmHWM")
    with smtplib.SMTP("127.0.0.1", worker.port, timeout=120) as client:
        client.ehlo("client.test")
        client.mail("a@remote.example")
        client.rcpt("alice@example.test")
        code, reply = client.data(message)
    assert code == 554, reply
    assert b"archive expands beyond 100 MB" in reply
    grown = vm(worker.pid, "VmHWM") - before
    # The message (27 MB) and its copies, plus 100 MB of archive members.
    assert grown < 400, f"the worker grew by {grown} MB for a {len(message) >> 20} MB message"


# -- DATA: one budget for every session of a process ---------------------------------------


def _open_data(raw, port: int) -> object:
    client = raw(port, timeout=30)
    assert client.reply().startswith(b"220")
    assert client.command(b"EHLO client.test").startswith(b"250")
    assert client.command(b"MAIL FROM:<a@remote.example>").startswith(b"250")
    assert client.command(b"RCPT TO:<alice@example.test>").startswith(b"250")
    assert client.command(b"DATA").startswith(b"354")
    return client


def _body(size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n"
    return HEAD + b"\r\n" + line * (size // len(line))


def test_sessions_over_the_data_budget_get_452_and_nothing_is_lost(
    runfilter,
    next_hop,
    raw,
):
    """FILTER_MAX_MESSAGE_SIZE=1 MB: the sessions of a process hold 4 MB of DATA at most.
    Four messages of 0.9 MB being sent fill it; a fifth is answered 452 4.3.1 (its
    sender tries again later), a MAIL announcing more than is left too; the four are
    delivered, and the budget they held is free again afterwards."""
    worker = runfilter(FILTER_MAX_MESSAGE_SIZE=str(2**20), FILTER_MAX_PER_IP="0")
    body = _body(900_000)
    holding = []
    for _ in range(4):
        client = _open_data(raw, worker.port)
        client.send(body)
        holding.append(client)
    time.sleep(0.5)  # the worker reads what they sent

    late = _open_data(raw, worker.port)
    late.send(body + b".\r\n")
    assert late.reply().startswith(b"452 4.3.1")

    announced = raw(worker.port, timeout=30)
    announced.reply()
    announced.command(b"EHLO client.test")
    assert announced.command(b"MAIL FROM:<a@remote.example> SIZE=900000").startswith(b"452")

    for client in holding:
        client.send(b".\r\n")
        assert client.reply().startswith(b"250")
    assert len(next_hop.deliveries) == 4

    # Released: the same session that was refused sends its message again.
    assert late.command(b"MAIL FROM:<a@remote.example>").startswith(b"250")
    assert late.command(b"RCPT TO:<alice@example.test>").startswith(b"250")
    assert late.command(b"DATA").startswith(b"354")
    late.send(body + b".\r\n")
    assert late.reply().startswith(b"250")
    assert len(next_hop.deliveries) == 5


def test_a_session_that_drops_in_the_middle_of_data_gives_its_budget_back(
    runfilter,
    next_hop,
    raw,
):
    """Four clients that vanish in the middle of a 0.9 MB message leave nothing held:
    four new ones are all accepted."""
    worker = runfilter(FILTER_MAX_MESSAGE_SIZE=str(2**20), FILTER_MAX_PER_IP="0")
    body = _body(900_000)
    for _ in range(4):
        client = _open_data(raw, worker.port)
        client.send(body)
        time.sleep(0.2)
        client.close()
    time.sleep(0.5)
    for _ in range(4):
        client = _open_data(raw, worker.port)
        client.send(body + b".\r\n")
        assert client.reply().startswith(b"250")
    assert len(next_hop.deliveries) == 4


def test_filter_max_data_bytes_sets_the_budget(
    runfilter,
    next_hop,
    raw,
):
    """FILTER_MAX_DATA_BYTES=2 MB with 1 MB messages: two messages being sent fill it, a
    third waits for its sender's retry."""
    worker = runfilter(FILTER_MAX_MESSAGE_SIZE=str(2**20), FILTER_MAX_DATA_BYTES=str(2 * 2**20),
                       FILTER_MAX_PER_IP="0")
    body = _body(900_000)
    holding = [_open_data(raw, worker.port) for _ in range(2)]
    for client in holding:
        client.send(body)
    time.sleep(0.5)
    late = _open_data(raw, worker.port)
    late.send(body + b".\r\n")
    assert late.reply().startswith(b"452 4.3.1")
    for client in holding:
        client.send(b".\r\n")
        assert client.reply().startswith(b"250")
    assert len(next_hop.deliveries) == 2


def test_a_data_budget_below_the_message_size_is_refused():
    from mailfilter.config import ConfigError, FilterConfig

    with pytest.raises(ConfigError, match="FILTER_MAX_DATA_BYTES=1000000 is below"):
        FilterConfig.from_env({"FILTER_MAX_MESSAGE_SIZE": "2000000",
                               "FILTER_MAX_DATA_BYTES": "1000000"})
