"""Control a running filter worker: `manage.py filterctl reload`.

`reload` sends SIGHUP to the `runfilter` whose pid is in FILTER_PID_FILE (`var/filter.pid`
by default); it passes the signal on to its worker processes, and each reloads the
profiles and signature files without closing a connection (a worker process started
later, in place of one that died, starts with what the others reloaded). A profile that
does not load leaves the ones in use and is logged by the worker with its file, line and
reason.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from quarantine.management.commands.runfilter import pid_file_path


class Command(BaseCommand):
    help = "Control the running filter worker (reload: profiles and signatures)."

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["reload"])

    def handle(self, *args, **options):
        path = pid_file_path()
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise CommandError(
                f"cannot read FILTER_PID_FILE={path}: {exc.strerror or exc}; is runfilter running?"
            ) from exc
        if not text.isdigit() or int(text) <= 1:
            raise CommandError(f"FILTER_PID_FILE={path} does not hold a process id: {text[:40]!r}")
        pid = int(text)
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            raise CommandError(f"no process {pid} (stale FILTER_PID_FILE={path})") from None
        except OSError:
            command = b"runfilter"  # no /proc here: trust the file
        if b"runfilter" not in command:
            # A pid file the worker could not remove, its number since given to another
            # process: that one must not get the signal.
            raise CommandError(
                f"process {pid} is not runfilter (stale FILTER_PID_FILE={path})")
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            raise CommandError(f"no process {pid} (stale FILTER_PID_FILE={path})") from None
        except PermissionError:
            raise CommandError(f"not allowed to signal process {pid}") from None
        self.stdout.write(f"reload requested from the filter worker (pid {pid})")
