"""The Django quarantine sink behind a real worker, and the `runfilter` command.

The sink writes from a worker thread with its own database connection, so these tests
use committed transactions (`transactional_db`).
"""

from __future__ import annotations

import signal
import smtplib
import subprocess

import pytest

from quarantine.models import Message
from quarantine.sink import DjangoQuarantineSink
from quarantine.store import FileStore
from tests.mailfilter.processes import start_runfilter

from .conftest import QuarantineEverything

MESSAGE = b"From: a@remote.example\r\nTo: alice@example.test\r\nSubject: held\r\n\r\nbody\r\n"


def send(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.test")
        client.mail("a@remote.example")
        client.rcpt("alice@example.test")
        return client.data(MESSAGE)


def test_discarded_message_is_on_disk_and_indexed_before_the_250(
    transactional_db, start_filter, quarantine_dir
):
    store = FileStore(quarantine_dir)
    worker = start_filter(
        sink=DjangoQuarantineSink(store),
        policy=QuarantineEverything(destiny="discard", category="SPAM", reasons=("GTUBE",)),
    )
    code, text = send(worker.port)
    assert code == 250
    mail_id = text.split(b"id=")[1].split()[0].decode()
    message = Message.objects.get(mail_id=mail_id)
    assert message.category == "SPAM"
    assert message.subject == "held"
    assert list(message.recipients.values_list("address", flat=True)) == ["alice@example.test"]
    stored = store.load(message.storage_key)
    # As amavisd-new keeps it: the worker's Received field, then the message as it came.
    received, _, original = stored.message.partition(b"\nFrom: ")
    assert received.startswith(b"Received: from client.test ([127.0.0.1])\n\tby ")
    assert b"From: " + original == MESSAGE.replace(b"\r\n", b"\n")
    assert stored.sender == "a@remote.example"


def test_quarantine_that_cannot_be_written_gets_451_and_leaves_no_row(
    transactional_db, start_filter, tmp_path, next_hop
):
    not_a_directory = tmp_path / "store"
    not_a_directory.write_text("a file where the store should be")
    worker = start_filter(
        sink=DjangoQuarantineSink(FileStore(not_a_directory)),
        policy=QuarantineEverything(destiny="bounce"),
    )
    code, _ = send(worker.port)
    assert code == 451
    assert Message.objects.count() == 0
    assert next_hop.deliveries == []


@pytest.fixture
def runfilter(tmp_path):
    processes: list[subprocess.Popen] = []

    def start(**env) -> tuple[subprocess.Popen, int]:
        process = start_runfilter({k: str(v) for k, v in env.items()})
        processes.append(process)
        line = process.stdout.readline()
        assert "filter listening on" in line, line + process.stderr.read()
        port = int(line.split(",")[0].rsplit(":", 1)[1])
        return process, port

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        process.stdout.close()
        process.stderr.close()


def test_runfilter_relays_to_the_next_hop_and_stops_on_sigterm(runfilter, next_hop, tmp_path):
    process, port = runfilter(
        FILTER_NEXT_HOP=f"127.0.0.1:{next_hop.port}", QUARANTINE_DIR=tmp_path / "q"
    )
    assert send(port)[0] == 250
    assert len(next_hop.deliveries) == 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0


def test_worker_killed_mid_data_leaves_nothing_in_the_store(runfilter, next_hop, tmp_path, raw):
    """Case 38: the sender got no reply, so it keeps the message; no partial file exists."""
    store_dir = tmp_path / "q"
    store_dir.mkdir()
    process, port = runfilter(
        FILTER_NEXT_HOP=f"127.0.0.1:{next_hop.port}", QUARANTINE_DIR=store_dir
    )
    client = raw(port)
    client.reply()
    client.command(b"EHLO client.test")
    client.command(b"MAIL FROM:<a@remote.example>")
    client.command(b"RCPT TO:<alice@example.test>")
    assert client.command(b"DATA")[:3] == b"354"
    client.send(b"Subject: half\r\n\r\n" + b"line\r\n" * 1000)
    process.kill()
    process.wait(10)
    assert client.closed()
    assert list(store_dir.rglob("*")) == []
    assert next_hop.deliveries == []


def test_runfilter_names_the_bad_variable(runfilter):
    process = start_runfilter({"FILTER_MODE": "sideways"})
    try:
        _, err = process.communicate(timeout=30)
    finally:
        process.stdout.close()
        process.stderr.close()
    assert process.returncode != 0
    assert "FILTER_MODE='sideways'" in err
