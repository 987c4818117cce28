"""Start every part of spamviewer in the foreground and stop them all on Ctrl-C.

The parts are the web viewer (gunicorn), the filter (`runfilter`), a Celery worker and
Celery beat. WEB_VIEWER=False (this host runs only the filter) leaves the web viewer out.
With REDIS_URL set the worker and beat use Redis; without it they get
EMBEDDED_BROKER=True, kombu's filesystem transport under var/celery/, so nothing else has
to be installed or started.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from spamviewer.env import ImproperlyConfiguredEnv, env_bool, env_str

# Seconds a part may take to stop after SIGTERM before its process group is killed. The
# worker finishes the task it is running first (Celery's warm shutdown).
STOP_TIMEOUT = 20
# Messages the embedded broker has handed out are kept this long, then removed.
PROCESSED_MAX_AGE = 24 * 3600
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: its own session (Ctrl-C on the terminal reaches only
    runsystem, which stops the parts in order), and SIGTERM when runsystem dies, even by
    SIGKILL, so that no part is left behind."""
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _describe_database() -> str:
    db = settings.DATABASES["default"]
    engine = db["ENGINE"].rsplit(".", 1)[-1]
    if engine == "sqlite3":
        return f"SQLite {db['NAME']}"
    where = f"{db.get('HOST') or 'local socket'}" + (f":{db['PORT']}" if db.get("PORT") else "")
    return f"{engine} database {db['NAME']} on {where}"


def _prune_processed(folder: Path, max_age: float = PROCESSED_MAX_AGE) -> None:
    limit = time.time() - max_age
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < limit:
                os.unlink(entry.path)
        except OSError:
            continue


def _gunicorn_has_control_socket() -> bool:
    import gunicorn

    return tuple(gunicorn.version_info) >= (27,)


class Command(BaseCommand):
    help = (
        "Start the web viewer (unless WEB_VIEWER=False), the filter, a Celery worker and "
        "Celery beat; stop them all on Ctrl-C."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--web-listen",
            default=env_str("WEB_LISTEN", "127.0.0.1:8000"),
            help="address:port of the web viewer (WEB_LISTEN, default 127.0.0.1:8000)",
        )

    def handle(self, *args, **options) -> None:
        try:
            web_viewer = env_bool("WEB_VIEWER", True)
        except ImproperlyConfiguredEnv as exc:
            raise CommandError(str(exc)) from None
        python = sys.executable
        web = options["web_listen"]
        manage = str(settings.BASE_DIR / "manage.py")
        env = os.environ.copy()
        redis_url = settings.REDIS_URL
        celery_dir = Path(settings.CELERY_DIR)
        worker_options: list[str] = []
        if redis_url:
            broker = f"Redis at {_without_password(redis_url)}"
            env.pop("EMBEDDED_BROKER", None)
        else:
            env["EMBEDDED_BROKER"] = "True"
            for name in ("queue", "control", "processed"):
                (celery_dir / name).mkdir(mode=0o700, parents=True, exist_ok=True)
            _prune_processed(celery_dir / "processed")
            broker = f"embedded broker in {celery_dir} (no Redis)"
            # One worker and a filesystem transport: no peers to exchange state with, and
            # polling for broadcasts through files would only cost time.
            worker_options = ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        celery = [python, "-m", "celery", "-A", "spamviewer"]
        web_options: list[str] = []
        if _gunicorn_has_control_socket():
            # Nothing here uses it, and its default path is shared by every gunicorn the
            # same user runs.
            web_options = ["--no-control-socket"]
        services: dict[str, list[str]] = {}
        if web_viewer:
            services["web"] = [
                python, "-m", "gunicorn", "spamviewer.wsgi:application",
                "--bind", web, "--workers", "2", "--access-logfile", "-", *web_options,
            ]
        services.update({
            # The filter reads FILTER_LISTEN / FILTER_NEXT_HOP (127.0.0.1:10024 -> :10025).
            "filter": [python, manage, "runfilter"],
            "worker": [
                *celery, "worker", "--loglevel", "INFO", "--concurrency", "2",
                "--hostname", "spamviewer@%h", *worker_options,
            ],
            "beat": [*celery, "beat", "--loglevel", "INFO"],
        })
        if web_viewer:
            web_line = f"Web viewer: http://{web}/"
        else:
            web_line = "Web viewer: off (WEB_VIEWER=False, this host runs only the filter)"
        procs: dict[str, subprocess.Popen] = {}
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            # preexec_fn is safe here: runsystem starts no threads.
            for name, argv in services.items():
                procs[name] = subprocess.Popen(
                    argv, cwd=settings.BASE_DIR, env=env, preexec_fn=_die_with_parent
                )
            self.stdout.write(
                self.style.SUCCESS(
                    f"{web_line}\n"
                    f"Filter: SMTP on {env_str('FILTER_LISTEN', '127.0.0.1:10024')}, passing "
                    f"mail to {env_str('FILTER_NEXT_HOP', '127.0.0.1:10025')}\n"
                    f"Celery worker and beat: {broker}; beat schedule "
                    f"{settings.CELERY_BEAT_SCHEDULE_FILENAME}\n"
                    f"Database: {_describe_database()}\n"
                    f"Store: {settings.QUARANTINE_DIR}\n"
                    "Ctrl-C stops everything."
                )
            )
            self.stdout.flush()
            last_prune = time.monotonic()
            while not stopping:
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        self.stderr.write(f"{name} exited with status {proc.returncode}")
                        stopping = True
                if not redis_url and time.monotonic() - last_prune > 3600:
                    _prune_processed(celery_dir / "processed")
                    last_prune = time.monotonic()
                time.sleep(0.5)
        finally:
            self._stop_all(procs)

    def _stop_all(self, procs: dict[str, subprocess.Popen]) -> None:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for name, proc in procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stderr.write(f"{name} did not stop within {STOP_TIMEOUT} s: killed")
            # Each part leads its own process group: whatever it forked (gunicorn's and
            # Celery's pool processes) goes with it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
