"""`manage.py runsystem` (what `make run` ends with) starts the viewer, the filter, a Celery
worker and Celery beat; tasks reach the worker through the embedded broker (or Redis when
REDIS_URL is set), and Ctrl-C stops every process it started."""

import os
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from quarantine.store import FileStore
from tests.ports import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
# A Redis database of its own: nothing else in the suite uses it.
REDIS_TEST_URL = "redis://127.0.0.1:6379/13"
TASK = "quarantine.tasks.index_quarantine_task"


def _descendants(pid: int) -> set[int]:
    """Every process below `pid`, read from /proc."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "SPAMVIEWER_VAR_DIR": str(tmp_path),
        "SPAMVIEWER_IGNORE_DOTENV": "1",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "STATIC_ROOT": str(tmp_path / "static"),
        "QUARANTINE_DIR": str(tmp_path / "quarantine"),
        "WEB_LISTEN": f"127.0.0.1:{free_port()}",
        "FILTER_LISTEN": f"127.0.0.1:{free_port()}",
        "VADMIN_PASSWORD": "a long enough test password",
        **extra,
    }
    for name in ("REDIS_URL", "EMBEDDED_BROKER"):
        if name not in extra:
            env.pop(name, None)
    return env


def _prepare(env: dict[str, str]) -> None:
    manage = [sys.executable, "manage.py"]
    for step in (["migrate", "--noinput", "-v0"], ["ensurevadmin"],
                 ["collectstatic", "--noinput", "-v0"]):
        subprocess.run(manage + step, cwd=ROOT, env=env, check=True, capture_output=True)


def _quarantine_one_message(root: Path) -> str:
    mail_id = "T" + uuid.uuid4().hex[:11]
    FileStore(root).write(
        category="SPAM", mail_id=mail_id, sender="sender@remote.example",
        recipients=["alice@example.test"],
        message=b"From: sender@remote.example\nSubject: queued through Celery\n\nhello\n",
    )
    return mail_id


def _indexed(db: Path, mail_id: str) -> bool:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT 1 FROM quarantine_message WHERE mail_id = ?", [mail_id])
        return row.fetchone() is not None
    finally:
        conn.close()


class RunningSystem:
    """runsystem in its own session, its output collected in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self._log_file = open(log, "w")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "runsystem"], cwd=ROOT, env=env,
            stdout=self._log_file, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text()

    def wait_for_output(self, text: str, timeout: float = 60.0) -> None:
        def seen():
            assert text in self.output(), f"{text!r} not in the output yet"
        wait_for(seen, timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self._log_file.close()


def test_runsystem_serves_the_viewer_and_the_filter_and_stops_on_ctrl_c(tmp_path):
    env = _environment(tmp_path)
    _prepare(env)
    web, filter_listen = env["WEB_LISTEN"], env["FILTER_LISTEN"]
    system = RunningSystem(env, tmp_path / "runsystem.log")
    children: set[int] = set()
    try:
        def fetch(path: str):
            with urllib.request.urlopen(f"http://{web}{path}", timeout=5) as r:
                return r.status, r.headers, r.read()

        _, _, health = wait_for(lambda: fetch("/healthz"))
        assert b'"ok"' in health
        status, headers, _ = fetch("/login/")
        assert status == 200 and "Content-Security-Policy" in headers

        def banner():
            host, port = filter_listen.rsplit(":", 1)
            with smtplib.SMTP(host, int(port), timeout=5) as smtp:
                return smtp.noop()

        code, _ = wait_for(banner)
        assert code == 250

        # The worker and beat are up on the embedded broker (no Redis in this test).
        system.wait_for_output("spamviewer@")
        system.wait_for_output(" ready.")
        system.wait_for_output("beat: Starting")
        assert list(tmp_path.glob("celerybeat-schedule*")), "beat wrote no schedule file"
        assert (tmp_path / "celery" / "queue").is_dir()

        # A task sent from another process (as the viewer sends them) is run by the worker
        # that runsystem started: the new store file shows up in the index.
        mail_id = _quarantine_one_message(tmp_path / "quarantine")
        sender_env = {**env, "EMBEDDED_BROKER": "True"}
        code = ("from quarantine.tasks import index_quarantine_task as task; "
                f"task.delay([{str(tmp_path / 'quarantine')!r}])")
        subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", code],
            cwd=ROOT, env=sender_env, check=True, capture_output=True, timeout=60,
        )
        wait_for(lambda: _assert(_indexed(tmp_path / "db.sqlite3", mail_id)), 60)
        system.wait_for_output(f"Task {TASK}[")
        assert "succeeded" in system.output()
        # It went through the broker's folder, not through the sender's own process.
        assert list((tmp_path / "celery" / "processed").glob("*.celery.msg"))

        children = _descendants(system.proc.pid)
        lines = [_command_line(pid) for pid in children]
        for part in ("gunicorn", "runfilter", "celery -A spamviewer worker",
                     "celery -A spamviewer beat"):
            assert any(part in line for line in lines), f"no {part} process: {lines}"
    finally:
        returncode = system.stop()
    out = system.output()
    assert returncode == 0, out
    assert f"http://{web}/" in out
    assert f"embedded broker in {tmp_path / 'celery'}" in out
    assert f"SQLite {tmp_path / 'db.sqlite3'}" in out
    # Ctrl-C left nothing behind: no process, nothing listening.
    wait_for(lambda: _assert(not [pid for pid in children if _alive(pid)]), 10)
    for listen in (web, filter_listen):
        host, port = listen.rsplit(":", 1)
        with socket.socket() as s:
            assert s.connect_ex((host, int(port))) != 0, f"{listen} still open"


def _redis_reachable() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _redis_reachable(), reason="no Redis on 127.0.0.1:6379")
def test_runsystem_uses_redis_when_redis_url_is_set(tmp_path):
    env = _environment(tmp_path, REDIS_URL=REDIS_TEST_URL)
    _prepare(env)
    system = RunningSystem(env, tmp_path / "runsystem.log")
    try:
        system.wait_for_output("spamviewer@")
        system.wait_for_output(" ready.")
        system.wait_for_output("beat: Starting")
        mail_id = _quarantine_one_message(tmp_path / "quarantine")
        subprocess.run(
            [sys.executable, "manage.py", "indexquarantine", "--async",
             str(tmp_path / "quarantine")],
            cwd=ROOT, env=env, check=True, capture_output=True, timeout=60,
        )
        wait_for(lambda: _assert(_indexed(tmp_path / "db.sqlite3", mail_id)), 60)
        system.wait_for_output(f"Task {TASK}[")
    finally:
        returncode = system.stop()
    out = system.output()
    assert returncode == 0, out
    assert f"Redis at {REDIS_TEST_URL}" in out
    assert "redis://127.0.0.1:6379/13" in out
    # Nothing went through the embedded broker.
    assert not (tmp_path / "celery").exists()


def _assert(condition: bool) -> None:
    assert condition
