"""Postfix content_filter -> worker -> Postfix reinjection smtpd -> smtp-sink, for real.

Debian's postfix runs with its own configuration and queue directories under the test's
tmp dir, on ephemeral loopback ports (never port 25), and is stopped by the test. It
needs root (Postfix's master refuses to start otherwise) and the postfix package.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mailfilter.config import FilterConfig
from mailfilter.server import FilterServer, ServerThread

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists(),
                       reason="postfix is not installed (apt-packages.txt)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="Postfix's master must start as root"),
]

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


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Quarantine:
    async def write(self, **kwargs) -> str:
        raise RuntimeError("nothing is quarantined in this test")


@pytest.fixture
def chain():
    inbound, worker_port, reinject, sink_port = _free_ports(4)
    # Postfix's daemons run as the postfix user: pytest's tmp_path (under a 0700 dir) is
    # out of their reach, so the instance lives in its own world-traversable directory.
    base = Path(tempfile.mkdtemp(prefix="sv-postfix-"))
    try:
        yield from _run_chain(base, inbound, worker_port, reinject, sink_port)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_chain(base, inbound, worker_port, reinject, sink_port):
    conf, spool, data, sink_dir = base / "etc", base / "spool", base / "data", base / "sink"
    for d in (conf, spool, data, sink_dir):
        d.mkdir(parents=True)
    os.chmod(base, 0o755)
    shutil.chown(data, "postfix")
    shutil.chown(sink_dir, "postfix")
    shutil.copy("/etc/postfix/master.cf", conf / "master.cf")
    (conf / "main.cf").write_text(
        f"""compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
myhostname = postfix.test
mydomain = postfix.test
myorigin = postfix.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = example.test
relayhost = [127.0.0.1]:{sink_port}
smtp_tls_security_level = none
smtpd_tls_security_level = none
content_filter = scan:[127.0.0.1]:{worker_port}
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
alias_maps =
alias_database =
local_recipient_maps =
smtputf8_enable = yes
"""
    )
    reinjection = f"127.0.0.1:{reinject}/inet"
    edits = [
        ["-M#", "smtp/inet"],
        ["-Me", f"127.0.0.1:{inbound}/inet=127.0.0.1:{inbound} inet n - n - - smtpd"],
        ["-Me", "scan/unix=scan unix - - n - 4 smtp"],
        ["-P", "scan/unix/smtp_send_xforward_command=yes",
         "scan/unix/disable_mime_output_conversion=yes"],
        ["-Me", f"{reinjection}=127.0.0.1:{reinject} inet n - n - 4 smtpd"],
        # FILTER_README's reinjection smtpd: no content_filter there, or mail loops.
        ["-P", f"{reinjection}/content_filter=",
         f"{reinjection}/receive_override_options="
         "no_unknown_recipient_checks,no_header_body_checks,no_milters",
         f"{reinjection}/smtpd_recipient_restrictions=permit_mynetworks,reject",
         f"{reinjection}/smtpd_authorized_xforward_hosts=127.0.0.0/8"],
        ["-Me", "postlog/unix-dgram=postlog unix-dgram n - n - 1 postlogd"],
        ["-F", "*/*/chroot=n"],
    ]
    for edit in edits:
        subprocess.run(["postconf", "-c", str(conf), *edit], check=True)

    sink = subprocess.Popen(
        ["smtp-sink", "-u", "postfix", "-d", f"{sink_dir}/msg.", f"127.0.0.1:{sink_port}", "10"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    config = FilterConfig(listen_port=worker_port, next_hop_port=reinject, hostname="filter.test")
    worker = ServerThread(lambda: FilterServer(config, sink=Quarantine()))
    worker.start()
    env = {**os.environ, "MAIL_CONFIG": str(conf)}
    started = subprocess.run(["postfix", "-c", str(conf), "start"], env=env,
                             capture_output=True, text=True)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        _wait_for_port(inbound)
        yield {"inbound": inbound, "sink_dir": sink_dir, "base": base}
    finally:
        subprocess.run(["postfix", "-c", str(conf), "stop"], env=env, capture_output=True)
        worker.stop()
        sink.kill()
        sink.wait(10)
        sink.stderr.close()


def _wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def test_message_through_postfix_and_the_worker_arrives_once_byte_for_byte(chain):
    with smtplib.SMTP("127.0.0.1", chain["inbound"]) as client:
        client.sendmail("sender@remote.example", ["alice@example.test"], MESSAGE)
    deadline = time.monotonic() + 30
    dumps: list[Path] = []
    while time.monotonic() < deadline:
        dumps = sorted(chain["sink_dir"].glob("msg.*"))
        if dumps:
            time.sleep(0.5)
            dumps = sorted(chain["sink_dir"].glob("msg.*"))
            break
        time.sleep(0.2)
    log = (chain["base"] / "maillog").read_text() if (chain["base"] / "maillog").exists() else ""
    assert len(dumps) == 1, log[-3000:]
    dump = dumps[0].read_bytes().replace(b"\r\n", b"\n")
    original = MESSAGE.replace(b"\r\n", b"\n")
    head, sep, rest = dump.partition(b"From: Sender")
    # smtp-sink ends each dump with one empty line of its own.
    assert sep and (sep + rest) == original + b"\n", dump
    # In front of the original: smtp-sink's own X- lines and Received fields (Postfix's
    # inbound smtpd, the worker's, the reinjection smtpd's, smtp-sink's), nothing else.
    fields = [line for line in head.split(b"\n") if line and not line[:1].isspace()]
    assert all(f.startswith((b"X-", b"Received:")) for f in fields), fields
    assert b"by filter.test (spamviewer) with ESMTP" in head
