"""Real clamd and spamd for the tests, each started once per session on loopback.

clamd gets a database of one `.ndb` signature for the EICAR test file (no official
database is needed, or downloadable) and small limits, so that the size-limit and
"Heuristics.Limits.Exceeded" answers can be provoked with a few megabytes:
StreamMaxLength 4M, MaxFileSize/MaxScanSize 1M, AlertExceedsMax yes.
It listens on an ephemeral TCP port and on a unix socket. Start-up takes well under a
second with this database.

spamd uses the rules Debian installs in /usr/share/spamassassin (no sa-update), a site
config of its own (required_score 5, no Bayes, no network tests, the plugin .pre files
copied from /etc/spamassassin), and listens on an ephemeral loopback port. Start-up takes
about one to two seconds while it compiles the rules.

Tests use the fixtures `clamd` and `spamd` by importing their functions:
`from tests.mailfilter.daemons import clamd_daemon`.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CLAMD = "/usr/sbin/clamd"
SPAMD = "/usr/sbin/spamd"
SA_RULES = Path("/usr/share/spamassassin")
SA_SITE = Path("/etc/spamassassin")
STREAM_MAX = 4 * 1024 * 1024
MAX_FILE = 1024 * 1024
START_TIMEOUT = 60.0

# The EICAR test file, stored bit-complemented so that this file is not itself taken for it.
_EICAR_COMPLEMENTED = base64.b64decode(
    "p8qw3q/av76vpMujr6WnysvXr6HWyLy81siC27q2vL6t0qyrvrG7vq270r6xq7aptq2qrNKruqyr0rm2s7re27fUt9U="
)


def eicar() -> bytes:
    """The 68-byte EICAR anti-virus test file."""
    return bytes(byte ^ 0xFF for byte in _EICAR_COMPLEMENTED)


def free_port() -> int:
    """A loopback TCP port that nothing listens on (closed right after it was picked)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Daemon:
    name: str
    process: subprocess.Popen
    host: str
    port: int
    path: str | None
    directory: Path
    log: Path
    startup_seconds: float

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _wait_until(ready: Callable[[], bool], daemon: Daemon) -> None:
    # Stop the daemon even when the test session itself dies before its teardown.
    atexit.register(daemon.stop)
    start = time.monotonic()
    while time.monotonic() - start < START_TIMEOUT:
        if daemon.process.poll() is not None:
            break
        if ready():
            daemon.startup_seconds = time.monotonic() - start
            return
        time.sleep(0.05)
    tail = daemon.log.read_text(errors="replace")[-3000:] if daemon.log.exists() else ""
    daemon.stop()
    pytest.fail(f"{daemon.name} did not start:\n{tail}")


def _answers(host: str, port: int, request: bytes, expected: bytes) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(request)
            return expected in conn.recv(256)
    except OSError:
        return False


def start_clamd(directory: Path) -> Daemon:
    database = directory / "db"
    database.mkdir(parents=True)
    (database / "eicar.ndb").write_text(f"Eicar-Test-Signature.NDB:0:*:{eicar().hex()}\n")
    port = free_port()
    sock = directory / "clamd.sock"
    log = directory / "clamd.log"
    conf = directory / "clamd.conf"
    conf.write_text(
        f"LocalSocket {sock}\n"
        f"TCPSocket {port}\n"
        "TCPAddr 127.0.0.1\n"
        f"DatabaseDirectory {database}\n"
        f"TemporaryDirectory {directory}\n"
        f"LogFile {log}\n"
        "Foreground yes\n"
        f"StreamMaxLength {STREAM_MAX}\n"
        f"MaxFileSize {MAX_FILE}\n"
        f"MaxScanSize {MAX_FILE}\n"
        "AlertExceedsMax yes\n"
    )
    process = subprocess.Popen(
        [CLAMD, "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    daemon = Daemon("clamd", process, "127.0.0.1", port, str(sock), directory, log, 0.0)
    _wait_until(lambda: _answers("127.0.0.1", port, b"zPING\0", b"PONG\0"), daemon)
    return daemon


def start_spamd(directory: Path) -> Daemon:
    # spamd drops root to nobody, so everything it reads must be world-readable.
    site = directory / "site"
    site.mkdir(parents=True)
    for pre in SA_SITE.glob("*.pre"):
        shutil.copy(pre, site / pre.name)
    (site / "local.cf").write_text(
        "required_score 5\n"
        "use_bayes 0\n"
        "bayes_auto_learn 0\n"
        "skip_rbl_checks 1\n"
        "dns_available no\n"
    )
    for path in (directory, site, *site.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = free_port()
    log = directory / "spamd.log"
    command = [
        SPAMD,
        f"--configpath={SA_RULES}",
        f"--siteconfigpath={site}",
        f"--listen=127.0.0.1:{port}",
        "--nouser-config",
        "--local",
        "--max-children=2",
        "--min-children=1",
        "--syslog=stderr",
        f"--helper-home-dir={directory}",
    ]
    if os.geteuid() == 0:
        command.append("--username=nobody")
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    daemon = Daemon("spamd", process, "127.0.0.1", port, None, directory, log, 0.0)
    ping = b"PING SPAMC/1.5\r\n\r\n"
    _wait_until(lambda: _answers("127.0.0.1", port, ping, b" 0 PONG"), daemon)
    return daemon


@contextlib.contextmanager
def world_readable_tmp(prefix: str) -> Iterator[Path]:
    """A temporary directory spamd can read after dropping root to nobody.

    pytest's tmp_path_factory directories live under a private (0700) parent.
    """
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session", name="clamd")
def clamd_daemon(tmp_path_factory) -> Iterator[Daemon]:
    if not os.access(CLAMD, os.X_OK):
        pytest.fail(f"{CLAMD} is missing: install clamav-daemon (apt-packages.txt)")
    daemon = start_clamd(tmp_path_factory.mktemp("clamd"))
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session", name="spamd")
def spamd_daemon() -> Iterator[Daemon]:
    if not os.access(SPAMD, os.X_OK):
        pytest.fail(f"{SPAMD} is missing: install spamd and spamassassin (apt-packages.txt)")
    with world_readable_tmp("spamd-") as directory:
        daemon = start_spamd(directory)
        yield daemon
        daemon.stop()
