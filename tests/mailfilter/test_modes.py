"""`runfilter` as an operator starts it: as root dropping to FILTER_USER after binding,
several processes on one port (FILTER_PROCESSES), and the Postfix settings it prints."""

from __future__ import annotations

import os
import pwd
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mailfilter.processes import stop_process

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = b"From: a@remote.example\r\nSubject: modes\r\n\r\nbody\r\n"


def _uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError("no Uid line")


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.fixture
def runfilter(tmp_path):
    processes: list[subprocess.Popen] = []

    def start(*args: str, **env: str) -> subprocess.Popen:
        full = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SPAMVIEWER_IGNORE_DOTENV": "1",
            "DJANGO_SETTINGS_MODULE": "spamviewer.settings",
            "FILTER_LISTEN": "127.0.0.1:0",
            "FILTER_HOSTNAME": "filter.test",
            "QUARANTINE_DIR": str(tmp_path / "q"),
            **env,
        }
        for name in ("DATABASE_URL", "SPAMVIEWER_VAR_DIR"):
            if name in os.environ:
                full[name] = os.environ[name]
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runfilter", *args], cwd=ROOT, env=full,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        stop_process(process)
        process.stdout.close()
        process.stderr.close()


def _port(process: subprocess.Popen) -> int:
    line = process.stdout.readline()
    assert "filter listening on" in line, line + process.stderr.read()
    return int(line.split(",")[0].rsplit(":", 1)[1])


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@needs_root
def test_started_as_root_the_worker_runs_as_filter_user_after_binding(runfilter, next_hop):
    nobody = pwd.getpwnam("nobody").pw_uid
    process = runfilter(FILTER_USER="nobody", FILTER_NEXT_HOP=f"127.0.0.1:{next_hop.port}")
    port = _port(process)
    assert _uids(process.pid) == [nobody] * 4
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("a@remote.example", ["alice@example.test"], MESSAGE)
    assert len(next_hop.deliveries) == 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0


@needs_root
def test_several_processes_share_the_port_and_all_run_as_filter_user(runfilter, next_hop):
    nobody = pwd.getpwnam("nobody").pw_uid
    process = runfilter(FILTER_USER="nobody", FILTER_PROCESSES="3",
                        FILTER_NEXT_HOP=f"127.0.0.1:{next_hop.port}")
    port = _port(process)
    children = _children(process.pid)
    assert len(children) == 3
    # Each child drops its privileges once its server is up.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(
        _uids(pid) == [nobody] * 4 for pid in [process.pid, *children]
    ):
        time.sleep(0.05)
    assert [_uids(pid) for pid in [process.pid, *children]] == [[nobody] * 4] * 4
    for _ in range(12):
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("a@remote.example", ["alice@example.test"], MESSAGE)
    assert len(next_hop.deliveries) == 12
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)


def test_unknown_filter_user_stops_the_start(runfilter):
    process = runfilter(FILTER_USER="no-such-user-here")
    _, err = process.communicate(timeout=30)
    assert process.returncode != 0
    assert "FILTER_USER='no-such-user-here'" in err


def test_postfix_config_is_printed_for_the_mode(runfilter):
    process = runfilter("--postfix-config", FILTER_MODE="proxy_filter",
                        FILTER_LISTEN="127.0.0.1:10024", FILTER_NEXT_HOP="127.0.0.1:10025")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "-o smtpd_proxy_filter=127.0.0.1:10024" in out
    assert "127.0.0.1:10025 inet n - n - - smtpd" in out
    assert "-o mynetworks=127.0.0.0/8" in out
    assert "-o content_filter=\n" in out
