"""Start every part of spamviewer in the foreground and stop them all on Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand

from spamviewer.env import env_str


class Command(BaseCommand):
    help = "Start the web viewer (and the other services) and stop them all on Ctrl-C."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--web-listen",
            default=env_str("WEB_LISTEN", "127.0.0.1:8000"),
            help="address:port of the web viewer (WEB_LISTEN, default 127.0.0.1:8000)",
        )

    def handle(self, *args, **options) -> None:
        python = sys.executable
        web = options["web_listen"]
        manage = str(settings.BASE_DIR / "manage.py")
        services = {
            "web": [
                python, "-m", "gunicorn", "spamviewer.wsgi:application",
                "--bind", web, "--workers", "2", "--access-logfile", "-",
            ],
            # The filter reads FILTER_LISTEN / FILTER_NEXT_HOP (127.0.0.1:10024 -> :10025).
            "filter": [python, manage, "runfilter"],
        }
        procs: dict[str, subprocess.Popen] = {}
        for name, argv in services.items():
            procs[name] = subprocess.Popen(argv, cwd=settings.BASE_DIR, env=os.environ.copy())
        self.stdout.write(
            self.style.SUCCESS(
                f"Web viewer: http://{web}/\n"
                f"Filter: SMTP on {env_str('FILTER_LISTEN', '127.0.0.1:10024')}, passing mail to "
                f"{env_str('FILTER_NEXT_HOP', '127.0.0.1:10025')}\n"
                f"Database: {settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}, "
                f"store: {settings.QUARANTINE_DIR}\nCtrl-C stops everything."
            )
        )
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            while not stopping:
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        self.stderr.write(f"{name} exited with status {proc.returncode}")
                        stopping = True
                time.sleep(0.5)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
