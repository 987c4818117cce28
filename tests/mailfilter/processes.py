"""Starting the real `manage.py runfilter` as a subprocess for the tests."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import urllib.request
from pathlib import Path

from mailfilter.stats import parse_metrics
from tests.ports import wait_for

ROOT = Path(__file__).resolve().parents[2]


def start_runfilter(env_extra: dict[str, str]) -> subprocess.Popen:
    """`manage.py runfilter` on an ephemeral loopback port, with the test run's database
    and var directory and `env_extra` on top; the caller stops it."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SPAMVIEWER_IGNORE_DOTENV": "1",
        "DJANGO_SETTINGS_MODULE": "spamviewer.settings",
        "FILTER_LISTEN": "127.0.0.1:0",
        "FILTER_HOSTNAME": "filter.test",
        **env_extra,
    }
    for name in ("DATABASE_URL", "SPAMVIEWER_VAR_DIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    return subprocess.Popen(
        [sys.executable, "manage.py", "runfilter"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM to a process still running, SIGKILL if it has not exited 10 s later."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


MESSAGE = b"From: a@remote.example\r\nSubject: processes\r\n\r\nbody\r\n"


# -- what /proc tells about the processes --------------------------------------------------


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def _tcp_sockets() -> list[tuple[str, str, str, int]]:
    """(local, remote, state, inode) of every IPv4 TCP socket, as /proc/net/tcp has them."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        rows.append((fields[1], fields[2], fields[3], int(fields[9])))
    return rows


def _loopback(port: int) -> str:
    return f"0100007F:{port:04X}"


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listening_inodes(port: int) -> set[int]:
    return {inode for local, _, state, inode in _tcp_sockets()
            if local == _loopback(port) and state == "0A"}


def owner(client: smtplib.SMTP, port: int, pids: list[int]) -> int:
    """The worker process that accepted `client`'s connection (after its greeting)."""
    local = client.sock.getsockname()[1]
    inodes = {inode for here, there, _, inode in _tcp_sockets()
              if here == _loopback(port) and there == _loopback(local) and inode}
    assert inodes, f"no server socket for the connection from port {local}"
    for pid in pids:
        if socket_inodes(pid) & inodes:
            return pid
    raise AssertionError(f"none of {pids} holds the connection from port {local}")


# -- the command ---------------------------------------------------------------------------


class Runfilter:
    """A running `manage.py runfilter`: its process, port and worker processes."""

    def __init__(self, process: subprocess.Popen, env: dict[str, str]) -> None:
        self.process = process
        self.env = env
        line = process.stdout.readline()
        assert "filter listening on" in line, line + process.stderr.read()
        self.port = int(line.split(",")[0].rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.process.pid

    def workers(self, count: int, timeout: float = 20) -> list[int]:
        """The worker processes, once there are `count` of them."""

        def ready():
            pids = children(self.pid)
            assert len(pids) == count, pids
            return pids

        return wait_for(ready, timeout)

    def send(self, count: int, *, workers: list[int] | None = None,
             expect: int = 250) -> list[int]:
        """`count` sessions of one message each, each on a connection of its own; the
        worker process that took each one (when `workers` are given)."""
        owners = []
        for _ in range(count):
            with smtplib.SMTP("127.0.0.1", self.port, timeout=15) as client:
                if workers is not None:
                    owners.append(owner(client, self.port, workers))
                client.ehlo("client.test")
                client.mail("a@remote.example")
                client.rcpt("alice@example.test")
                code, reply = client.data(MESSAGE)
                assert code == expect, reply
        return owners

    def metrics(self) -> dict[str, int]:
        url = f"http://{self.env['FILTER_METRICS_LISTEN']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            key.removeprefix("spamviewer_filter_"): value
            for key, value in parse_metrics(text).items()
        }

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(20)
