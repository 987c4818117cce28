"""Starting the real `manage.py runfilter` as a subprocess for the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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
