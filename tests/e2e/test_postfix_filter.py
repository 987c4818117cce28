"""Postfix content_filter -> worker -> Postfix reinjection smtpd -> smtp-sink, for real;
and what Postfix does when a hop of that chain fails (it keeps the message queued and
delivers it once the hop is back, exactly once).

Needs root (Postfix's master refuses to start otherwise) and the postfix package; the
instance and its helpers are in `tests/e2e/postfix.py`.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from mailfilter.config import FilterConfig
from quarantine.models import Message
from quarantine.sink import DjangoQuarantineSink
from quarantine.store import FileStore
from tests.e2e.postfix import (
    chain_factory,
    free_ports,
    requires_postfix,
    wait_for_port,
    wait_until,
)
from tests.mailfilter.conftest import QuarantineEverything

pytestmark = requires_postfix
postfix_chain = pytest.fixture(chain_factory, name="postfix_chain")

MESSAGE = (
    b"From: Sender <sender@remote.example>\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: through postfix\r\n"
    b"Date: Fri, 20 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <e2e-1@remote.example>\r\n"
    b"\r\n"
    b"Line one.\r\n"
    b".A line that starts with a dot.\r\n"
    b"Last line.\r\n"
)


def assert_original_plus_top_fields(dump: bytes, original: bytes) -> bytes:
    """The dump is `original`, byte for byte, under smtp-sink's X- lines and the Received
    fields of each hop; returns what is above the original."""
    dump = dump.replace(b"\r\n", b"\n")
    original = original.replace(b"\r\n", b"\n")
    first = original.split(b"\n", 1)[0]
    head, sep, rest = dump.partition(first)
    # smtp-sink ends each dump with one empty line of its own.
    assert sep and (sep + rest) == original + b"\n", dump
    fields = [line for line in head.split(b"\n") if line and not line[:1].isspace()]
    assert all(f.startswith((b"X-", b"Received:")) for f in fields), fields
    return head


def deferred(chain, reason: str) -> list[dict]:
    """The queue once Postfix deferred a message for `reason` and still holds it.

    The delivery agent's log line is the evidence, not the queue directory: an agent that
    still holds the queue file when the queue manager rescans makes it park the message
    in `incoming` for a minute ("skipped, still being delivered"). It is queued all the
    same, and `postqueue -f` picks it up from there too."""
    def check():
        queue = chain.postfix.queue()
        lines = chain.postfix.log().splitlines()
        found = [
            m for m in queue
            if any(f"{m['queue_id']}: to=" in line and "status=deferred (" in line
                   and reason in line for line in lines)
        ]
        return queue if found else None

    # Generous: a loaded machine can take a while; the wait ends as soon as it holds.
    queue = wait_until(check, timeout=90)
    assert queue, (chain.postfix.queue(), chain.postfix.log()[-3000:])
    return queue


def test_message_through_postfix_and_the_worker_arrives_once_byte_for_byte(postfix_chain):
    chain = postfix_chain()
    chain.send(MESSAGE)
    dumps = chain.delivered(1)
    assert len(dumps) == 1, chain.postfix.log()[-3000:]
    head = assert_original_plus_top_fields(dumps[0], MESSAGE)
    assert b"by filter.test (spamviewer) with ESMTP" in head
    assert chain.queue_empty()


def test_reinjection_smtpd_down_keeps_the_message_queued_until_it_is_back(postfix_chain):
    chain = postfix_chain()
    service, line, overrides = chain.snippet.services[-1]
    chain.postfix.postconf("-M#", service)
    chain.postfix.reload()
    assert wait_until(lambda: _refused(chain.config.next_hop_port), timeout=10)

    chain.send(MESSAGE)
    # The worker could not open a transaction with its next hop: 451 at MAIL.
    deferred(chain, "451 4.4.1 Next hop unavailable")
    assert chain.sink.dumps() == []
    assert chain.worker.stat("next_hop_failures", "connect") >= 1

    chain.postfix.postconf("-Me", f"{service}={line}")
    chain.postfix.postconf("-P", *(f"{service}/{k}={v}" for k, v in overrides.items()))
    chain.postfix.reload()
    wait_for_port(chain.config.next_hop_port)
    chain.postfix.flush()
    dumps = chain.delivered(1)
    assert len(dumps) == 1
    assert_original_plus_top_fields(dumps[0], MESSAGE)
    assert chain.queue_empty()


def test_worker_down_keeps_the_message_queued_until_it_is_back(postfix_chain):
    chain = postfix_chain()
    chain.worker.stop()
    chain.send(MESSAGE)
    deferred(chain, "Connection refused")
    assert chain.sink.dumps() == []

    chain.worker.start()
    chain.postfix.flush()
    dumps = chain.delivered(1)
    assert len(dumps) == 1
    assert_original_plus_top_fields(dumps[0], MESSAGE)
    assert chain.queue_empty()


class StallingForwarder:
    """A TCP forwarder between Postfix and the worker that, while `stall` is set, stops
    passing client data on once the worker said 354 and some message text went through:
    the worker is then in the middle of DATA for as long as the test likes."""

    def __init__(self, port: int, target: int) -> None:
        self.target = target
        self.stall = True
        self.stalled = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.2)
        self.closing = False
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        saw_354 = threading.Event()

        def downstream() -> None:
            try:
                while chunk := upstream.recv(65536):
                    if b"354 " in chunk:
                        saw_354.set()
                    client.sendall(chunk)
            except OSError:
                pass
            finally:
                client.close()
                upstream.close()

        thread = threading.Thread(target=downstream, daemon=True)
        thread.start()
        after_354 = 0
        try:
            while chunk := client.recv(16384):
                if self.stall and saw_354.is_set():
                    after_354 += len(chunk)
                    if after_354 > 32768:
                        self.stalled.set()
                        thread.join()  # until the worker's side is gone
                        return
                upstream.sendall(chunk)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()
        thread.join(5)

    def close(self) -> None:
        self.closing = True
        self.listener.close()
        for thread in self.threads:
            thread.join(5)


def test_worker_killed_in_the_middle_of_data_then_postfix_retries_and_it_arrives_once(
    postfix_chain, tmp_path
):
    """Case 38: SIGKILL while Postfix sends a large message; Postfix got no reply to the
    end of data, keeps the message, and the retry through a new worker delivers it once.
    Nothing half-written is left in the quarantine store."""
    store = tmp_path / "store"
    store.mkdir()
    chain = postfix_chain(worker="process", env={"QUARANTINE_DIR": str(store)}, start=False)
    (forward_port,) = free_ports(1)
    chain.postfix.postconf("-e", f"content_filter=scan:[127.0.0.1]:{forward_port}")
    forwarder = StallingForwarder(forward_port, chain.config.listen_port)
    try:
        chain.start()
        big = MESSAGE + b"".join(b"%06d %s\r\n" % (i, b"x" * 70) for i in range(3000))
        chain.send(big)
        assert forwarder.stalled.wait(20), chain.postfix.log()[-3000:]
        chain.worker.kill()
        deferred(chain, "lost connection")
        assert chain.sink.dumps() == []

        forwarder.stall = False
        chain.worker.start()
        chain.postfix.flush()
        dumps = chain.delivered(1)
        assert len(dumps) == 1, chain.postfix.log()[-3000:]
        assert_original_plus_top_fields(dumps[0], big)
        assert chain.queue_empty()
        assert list(store.rglob("*")) == []
    finally:
        chain.stop()
        forwarder.close()


def test_quarantine_not_writable_with_a_discard_profile_keeps_the_message_queued(
    postfix_chain, transactional_db, tmp_path
):
    store_path = tmp_path / "store"
    store_path.write_text("a file where the store's directory should be")
    chain = postfix_chain(
        sink=DjangoQuarantineSink(FileStore(store_path)),
        policy=QuarantineEverything(destiny="discard", category="SPAM", reasons=("GTUBE",)),
    )
    chain.send(MESSAGE)
    deferred(chain, "451 4.3.0 Cannot keep a copy")
    assert Message.objects.count() == 0
    assert chain.sink.dumps() == []

    # The store comes back: the retry is kept (250 to Postfix) and nothing is relayed.
    store_path.unlink()
    store_path.mkdir()
    chain.postfix.flush()
    assert chain.queue_empty(timeout=20), chain.postfix.log()[-2000:]
    assert Message.objects.count() == 1
    assert Message.objects.get().subject == "through postfix"
    assert chain.sink.dumps() == []


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_postfix_config_is_what_the_snippet_says(postfix_chain):
    """Case 30: the reinjection smtpd listens on loopback, relays only for mynetworks
    limited to loopback, and has no content_filter (no loop); the worker's default
    listener is loopback too."""
    chain = postfix_chain(start=False)
    master = chain.postfix.postconf("-P")
    port = chain.config.next_hop_port
    assert f"127.0.0.1:{port}/inet/mynetworks = 127.0.0.0/8" in master
    assert f"127.0.0.1:{port}/inet/smtpd_recipient_restrictions = permit_mynetworks,reject" \
        in master
    assert f"127.0.0.1:{port}/inet/smtpd_relay_restrictions = permit_mynetworks,reject" \
        in master
    assert f"127.0.0.1:{port}/inet/content_filter =\n" in master
    assert f"127.0.0.1:{port}/inet/smtpd_authorized_xforward_hosts = 127.0.0.0/8" in master
    default = FilterConfig.from_env({})
    assert (default.listen_host, default.listen_port) == ("127.0.0.1", 10024)
    chain.worker.start()
    assert chain.worker.thread.server._server.sockets[0].getsockname()[0] == "127.0.0.1"


# Before the queue: Postfix's smtpd_proxy_filter --------------------------------------


def test_proxy_filter_answers_with_the_next_hops_reply_and_passes_client_attributes(
    postfix_chain
):
    chain = postfix_chain(mode="proxy_filter")
    import smtplib

    # The client comes from 127.0.0.2; Postfix and the worker talk over 127.0.0.1.
    with smtplib.SMTP("127.0.0.1", chain.inbound, local_hostname="client.example",
                      source_address=("127.0.0.2", 0)) as client:
        client.ehlo()
        client.mail("sender@remote.example")
        client.rcpt("alice@example.test")
        code, text = client.data(MESSAGE)
    assert code == 250, text
    # Postfix passes the worker's reply on verbatim, and the worker's reply is the
    # reinjection smtpd's own: its queue id is the one in its Received field.
    queue_id = text.decode().rsplit("queued as ", 1)[1].strip()
    dumps = chain.delivered(1)
    assert len(dumps) == 1, chain.postfix.log()[-3000:]
    head = assert_original_plus_top_fields(dumps[0], MESSAGE)
    assert f"with ESMTP id {queue_id}".encode() in head
    # XFORWARD from Postfix to the worker, and from the worker to the reinjection smtpd:
    # the reinjection smtpd logs the original client, not its peer (the worker).
    log = chain.postfix.log()
    assert f"{queue_id}: client=localhost[127.0.0.1], orig_client=" in log, log
    assert "[127.0.0.2]" in log.split(f"{queue_id}: client=", 1)[1].split("\n", 1)[0]
    # The worker's own Received field names the original client too.
    assert b"from client.example (" in head.split(b"by filter.test (spamviewer)")[0]
    assert chain.worker.stat("messages_passed") == 1
    assert chain.queue_empty()


def test_proxy_filter_passes_dsn_parameters_on(postfix_chain):
    """Postfix hands the client's MAIL and RCPT parameters to the proxy unchanged; the
    worker offers DSN, checks RET/ENVID/NOTIFY/ORCPT and passes them to the next hop,
    which keeps them with the queued message (smtp-sink shows what it was sent)."""
    chain = postfix_chain(mode="proxy_filter")
    chain.send(
        MESSAGE,
        mail_options=["RET=HDRS", "ENVID=abc+2Bdef"],
        rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;alice@example.test"],
    )
    dumps = chain.delivered(1)
    assert len(dumps) == 1
    header = dumps[0].split(b"\n\n", 1)[0]
    assert b"RET=HDRS" in header and b"ENVID=abc+2Bdef" in header, header
    assert b"NOTIFY=SUCCESS,FAILURE" in header, header
    assert b"ORCPT=rfc822;alice@example.test" in header, header


def test_proxy_filter_content_refused_reaches_the_client_and_nothing_is_queued(
    postfix_chain
):
    chain = postfix_chain(
        mode="proxy_filter",
        policy=QuarantineEverything(destiny="reject", category="VIRUS", reasons=("Eicar",)),
    )
    import smtplib

    with pytest.raises(smtplib.SMTPDataError) as refused:
        chain.send(MESSAGE)
    assert refused.value.smtp_code == 554
    time.sleep(1)
    assert chain.sink.dumps() == []
    assert chain.postfix.queue() == []


SMUGGLING = {
    "lf-dot-lf": b"\n.\n",
    "cr-dot-cr": b"\r.\r",
    "cr-dot-lf": b"\r.\n",
    "lf-dot-cr": b"\n.\r",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
    "crlf-nul-dot-crlf": b"\r\n\x00.\r\n",
    "crlf-dot-nul-crlf": b"\r\n.\x00\r\n",
}


def _raw_session(port: int, body: bytes) -> list[bytes]:
    """EHLO/MAIL/RCPT/DATA one by one, then the body in one write, then QUIT; returns
    every reply from the one to the end of data on."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    buffer = b""

    def reply() -> bytes:
        nonlocal buffer
        while True:
            lines = buffer.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] != b"-":
                    out = b"\r\n".join(lines[: i + 1])
                    buffer = b"\r\n".join(lines[i + 1 :])
                    return out
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(buffer)
            buffer += chunk

    try:
        reply()
        for command in (b"EHLO client.example", b"MAIL FROM:<sender@remote.example>",
                        b"RCPT TO:<alice@example.test>", b"DATA"):
            sock.sendall(command + b"\r\n")
            assert reply()[:1] in (b"2", b"3")
        sock.sendall(body)
        replies = [reply()]
        sock.sendall(b"QUIT\r\n")
        while True:
            try:
                replies.append(reply())
            except ConnectionError:
                return replies
    finally:
        sock.close()


def test_smuggling_variants_through_postfix_proxy_and_worker_make_at_most_one_message(
    postfix_chain
):
    """Case 13: each end-of-data look-alike goes to Postfix (smtpd_forbid_bare_newline =
    normalize, no exclusions), which hands the message to the worker, which relays it to
    the reinjection smtpd: at every hop the count is 1 (or 0 when refused, everywhere),
    and the smuggled second message exists nowhere."""
    chain = postfix_chain(mode="proxy_filter")
    expected = 0
    for name, ending in SMUGGLING.items():
        received_before = chain.worker.stat("messages_received")
        body = (
            b"Subject: variant " + name.encode() + b"\r\n\r\nfirst message" + ending
            + b"MAIL FROM:<evil@remote.example>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
            + b"Subject: smuggled " + name.encode() + b"\r\n\r\nsecond\r\n.\r\n"
        )
        replies = _raw_session(chain.inbound, body)
        # One reply to the one end of data, then the reply to QUIT: nothing in the body
        # was taken as a command by Postfix or by the worker behind it.
        assert len(replies) == 2 and replies[1].startswith(b"221"), (name, replies)
        accepted = replies[0].startswith(b"250")
        assert accepted or replies[0][:1] == b"5", (name, replies)
        assert chain.worker.stat("messages_received") - received_before == int(accepted)
        expected += int(accepted)
    dumps = chain.delivered(expected, settle=1)
    assert len(dumps) == expected
    for name in SMUGGLING:
        matching = [d for d in dumps if b"Subject: variant " + name.encode() + b"\n" in
                    d.replace(b"\r\n", b"\n")]
        assert len(matching) <= 1, name
    assert not any(b"Subject: smuggled" in d.split(b"\n\n", 1)[0] for d in dumps)
    assert chain.queue_empty()
