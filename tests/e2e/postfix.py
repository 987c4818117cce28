"""A private, real Postfix around the worker, for the end-to-end tests.

`Chain` is Postfix's inbound smtpd -> worker -> Postfix's reinjection smtpd -> smtp-sink,
in either mode: `content_filter` (after the queue) or `proxy_filter` (before it). The
Postfix part of the configuration comes from `mailfilter.config.postfix_snippet`, the
same settings `manage.py runfilter --postfix-config` prints, so the tests run what the
documentation recommends.

Debian's Postfix runs with its own configuration and queue directories in a fresh
world-traversable directory (its daemons run as the postfix user, and pytest's tmp_path
is out of their reach), on ephemeral loopback ports, with queue timers of a second or two
so that deferred mail is retried quickly, and is stopped by the fixture that started it.
The worker runs in a thread of the test (so the test reads its counters) or as a
`manage.py runfilter` process (so that a test can SIGKILL it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailfilter.config import FilterConfig, postfix_snippet
from mailfilter.server import FilterServer, ServerThread

ROOT = Path(__file__).resolve().parents[2]

requires_postfix = [
    pytest.mark.postfix,
    pytest.mark.skipif(
        shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists(),
        reason="postfix is not installed (apt-packages.txt)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="Postfix's master must start as root"),
]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def wait_until(predicate: Callable[[], Any], timeout: float = 20, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


class NoQuarantine:
    async def write(self, **kwargs) -> str:
        raise RuntimeError("nothing is quarantined in this test")


class ThreadWorker:
    """The worker on an event loop in a thread of the test process."""

    def __init__(self, config: FilterConfig, **parts: Any) -> None:
        self.config = config
        self.parts = {"sink": NoQuarantine(), **parts}
        self.thread: ServerThread | None = None

    def start(self) -> None:
        self.thread = ServerThread(lambda: FilterServer(self.config, **self.parts))
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.stop()
            self.thread = None

    def stat(self, name: str, label: str = "") -> int:
        assert self.thread is not None
        server = self.thread.server
        if label == "*":
            return self.thread.call(lambda: server.stats.total(name))
        return self.thread.call(lambda: server.stats.get(name, label))


class ProcessWorker:
    """`manage.py runfilter` in a process of its own."""

    def __init__(self, config: FilterConfig, *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env or {}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SPAMVIEWER_IGNORE_DOTENV": "1",
            "DJANGO_SETTINGS_MODULE": "spamviewer.settings",
            "FILTER_LISTEN": f"{self.config.listen_host}:{self.config.listen_port}",
            "FILTER_NEXT_HOP": f"{self.config.next_hop_host}:{self.config.next_hop_port}",
            "FILTER_MODE": self.config.mode,
            "FILTER_HOSTNAME": self.config.hostname,
            **self.env,
        }
        for name in ("DATABASE_URL", "SPAMVIEWER_VAR_DIR"):
            if name in os.environ and name not in env:
                env[name] = os.environ[name]
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "runfilter"], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.process.stdout.readline()
        assert "filter listening on" in line, line + self.process.stderr.read()

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the worker."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self._reap()

    def _reap(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process.stdout.close()
        self.process.stderr.close()
        self.process = None


class SmtpSink:
    """Postfix's smtp-sink, writing each message it accepts to a file of its own."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.process = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", "-d", f"{directory}/msg.", f"127.0.0.1:{port}",
             "50"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def dumps(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.directory.glob("msg.*"))]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


class Postfix:
    """One Postfix instance: configuration directory, queue, log."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.conf = base / "etc"
        self.spool = base / "spool"
        self.env = {**os.environ, "MAIL_CONFIG": str(self.conf)}

    def postconf(self, *args: str) -> str:
        done = subprocess.run(["postconf", "-c", str(self.conf), *args], check=True,
                              capture_output=True, text=True)
        return done.stdout

    def configure(self, *, relayhost_port: int) -> None:
        """A main.cf for loopback only: mail for example.test is relayed to
        127.0.0.1:relayhost_port, queue timers of a second or two, no smtpd listening yet
        (`add_smtpd`), the log in the base directory. Services added later still need
        `postconf -F */*/chroot=n`."""
        data = self.base / "data"
        for d in (self.conf, self.spool, data):
            d.mkdir(parents=True)
        shutil.chown(data, "postfix")
        shutil.copy("/etc/postfix/master.cf", self.conf / "master.cf")
        (self.conf / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {self.spool}
data_directory = {data}
myhostname = postfix.test
mydomain = postfix.test
myorigin = postfix.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = example.test
relayhost = [127.0.0.1]:{relayhost_port}
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file = {self.base}/maillog
maillog_file_prefixes = {self.base}
alias_maps =
alias_database =
local_recipient_maps =
smtputf8_enable = yes
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
transport_retry_time = 1s
smtp_connect_timeout = 5s
"""
        )
        self.postconf("-M#", "smtp/inet")
        self.postconf("-Me", "postlog/unix-dgram=postlog unix-dgram n - n - 1 postlogd")

    def add_smtpd(self, port: int) -> None:
        self.postconf("-Me", f"127.0.0.1:{port}/inet=127.0.0.1:{port} inet n - n - - smtpd")

    def command(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["postfix", "-c", str(self.conf), *args], env=self.env,
                              capture_output=True, text=True)

    def start(self) -> None:
        started = self.command("start")
        assert started.returncode == 0, started.stdout + started.stderr

    def stop(self) -> None:
        self.command("stop")

    def reload(self) -> None:
        done = self.command("reload")
        assert done.returncode == 0, done.stdout + done.stderr

    def flush(self) -> None:
        """Retry every deferred message now (`postqueue -f`)."""
        subprocess.run(["postqueue", "-c", str(self.conf), "-f"], check=True, env=self.env)

    def queue(self) -> list[dict]:
        """The queued messages, as `postqueue -j` describes them."""
        done = subprocess.run(["postqueue", "-c", str(self.conf), "-j"], check=True,
                              capture_output=True, text=True, env=self.env)
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def log(self) -> str:
        path = self.base / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""


class Chain:
    """Postfix inbound smtpd -> worker -> Postfix reinjection smtpd -> smtp-sink."""

    def __init__(self, *, mode: str, worker: str, parts: dict, env: dict | None,
                 config_changes: dict) -> None:
        self.mode = mode
        self.inbound, worker_port, reinject, sink_port = free_ports(4)
        self.base = Path(tempfile.mkdtemp(prefix="sv-postfix-"))
        os.chmod(self.base, 0o755)
        self.config = FilterConfig(
            listen_port=worker_port, next_hop_port=reinject, hostname="filter.test",
            mode=mode, relay_connect_timeout=5, relay_command_timeout=10,
            relay_data_timeout=10,
        ).with_changes(**config_changes)
        self.snippet = postfix_snippet(
            self.config, inbound=f"127.0.0.1:{self.inbound}", transport="scan"
        )
        sink_dir = self.base / "sink"
        sink_dir.mkdir()
        shutil.chown(sink_dir, "postfix")
        self.sink = SmtpSink(sink_port, sink_dir)
        self.postfix = Postfix(self.base)
        self._configure(sink_port)
        if worker == "process":
            self.worker: ThreadWorker | ProcessWorker = ProcessWorker(self.config, env=env)
        else:
            self.worker = ThreadWorker(self.config, **parts)

    def _configure(self, sink_port: int) -> None:
        pf = self.postfix
        pf.configure(relayhost_port=sink_port)
        if self.mode == "content_filter":
            pf.add_smtpd(self.inbound)
        for arguments in self.snippet.postconf_arguments():
            pf.postconf(*arguments)
        pf.postconf("-F", "*/*/chroot=n")

    def start(self) -> Chain:
        self.worker.start()
        self.postfix.start()
        wait_for_port(self.inbound)
        return self

    def stop(self) -> None:
        try:
            self.postfix.stop()
        finally:
            try:
                self.worker.stop()
            finally:
                self.sink.stop()
                shutil.rmtree(self.base, ignore_errors=True)

    def send(self, message: bytes, *, sender: str = "sender@remote.example",
             recipients: tuple[str, ...] = ("alice@example.test",), **options: Any) -> Any:
        with smtplib.SMTP("127.0.0.1", self.inbound, local_hostname="client.example") as c:
            return c.sendmail(sender, list(recipients), message, **options)

    def delivered(self, count: int, *, settle: float = 0.5, timeout: float = 90) -> list[bytes]:
        """The sink's messages once there are `count` (or the time is up), after a pause
        in which a duplicate would have shown up."""
        wait_until(lambda: len(self.sink.dumps()) >= count, timeout)
        time.sleep(settle)
        return self.sink.dumps()

    def queue_empty(self, timeout: float = 60) -> bool:
        return bool(wait_until(lambda: self.postfix.queue() == [], timeout))


def chain_factory() -> Iterator[Callable[..., Chain]]:
    """For a fixture: `postfix_chain = pytest.fixture(chain_factory, name=...)`; the test
    calls `postfix_chain(mode=..., worker="thread"|"process", **worker parts or config)`
    and every chain it made is stopped afterwards."""
    chains: list[Chain] = []

    def make(*, mode: str = "content_filter", worker: str = "thread",
             env: dict | None = None, sink: Any = None, policy: Any = None,
             lookup: Any = None, start: bool = True, **config_changes: Any) -> Chain:
        parts = {k: v for k, v in (("sink", sink), ("policy", policy), ("lookup", lookup))
                 if v is not None}
        chain = Chain(mode=mode, worker=worker, parts=parts, env=env,
                      config_changes=config_changes)
        chains.append(chain)
        return chain.start() if start else chain

    yield make
    for chain in chains:
        chain.stop()
