"""`manage.py runsystem` (what `make run` ends with) starts the viewer and the filter, and
Ctrl-C stops them all."""

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return check()
        except OSError as exc:
            last = exc
            time.sleep(0.2)
    raise AssertionError(f"not up after {timeout} s: {last}")


def test_runsystem_serves_the_viewer_and_the_filter_and_stops_on_ctrl_c(tmp_path):
    web_port, filter_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "SPAMVIEWER_VAR_DIR": str(tmp_path),
        "SPAMVIEWER_IGNORE_DOTENV": "1",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "STATIC_ROOT": str(tmp_path / "static"),
        "WEB_LISTEN": f"127.0.0.1:{web_port}",
        "FILTER_LISTEN": f"127.0.0.1:{filter_port}",
        "VADMIN_PASSWORD": "a long enough test password",
    }
    manage = [sys.executable, "manage.py"]
    for step in (["migrate", "--noinput", "-v0"], ["ensurevadmin"],
                 ["collectstatic", "--noinput", "-v0"]):
        subprocess.run(manage + step, cwd=ROOT, env=env, check=True, capture_output=True)

    proc = subprocess.Popen(manage + ["runsystem"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        def fetch(path: str):
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}{path}", timeout=5) as r:
                return r.status, r.headers, r.read()

        _, _, health = _wait_for(lambda: fetch("/healthz"))
        assert b'"ok"' in health
        status, headers, _ = fetch("/login/")
        assert status == 200 and "Content-Security-Policy" in headers

        def banner():
            with smtplib.SMTP("127.0.0.1", filter_port, timeout=5) as smtp:
                return smtp.noop()

        code, _ = _wait_for(banner)
        assert code == 250
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{web_port}/" in out
    # Nothing is left listening once runsystem has returned.
    for port in (web_port, filter_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
