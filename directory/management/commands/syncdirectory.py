from __future__ import annotations

import sys

from django.core.management.base import BaseCommand, CommandError
from django.db import IntegrityError

from directory.ldap import DirectoryError
from directory.relaymap import RelayMapError
from directory.sync import SyncBusy, sync_directory


class Command(BaseCommand):
    help = (
        "Read the mail-enabled objects of the directory, update the viewer's users and "
        "addresses, then rewrite the Postfix relay map."
    )

    def add_arguments(self, parser):
        parser.add_argument("--clear", action="store_true",
                            help="redraw everything that comes from the directory: users "
                                 "whose object is gone are deleted, not only disabled")
        parser.add_argument("--dry-run", action="store_true",
                            help="report what would change and change nothing")
        parser.add_argument("--force", action="store_true",
                            help="accept a relay map that is empty or much smaller than "
                                 "the current one")

    def handle(self, *args, clear=False, dry_run=False, force=False, **options):
        bars: dict = {}
        progress = self._progress(bars) if sys.stderr.isatty() else None
        try:
            summary = sync_directory(clear=clear, dry_run=dry_run, force=force,
                                     progress=progress)
        except (DirectoryError, RelayMapError, SyncBusy, IntegrityError) as exc:
            raise CommandError(f"directory sync failed, nothing changed: {exc}") from exc
        finally:
            for bar in bars.values():
                bar.close()
        for conflict in summary.conflicts:
            self.stderr.write(f"conflict: {conflict}")
        self.stdout.write(str(summary))

    @staticmethod
    def _progress(bars: dict):
        from tqdm import tqdm

        labels = {"read": "reading the directory", "apply": "updating users"}

        def progress(step: str, done: int, total: int | None) -> None:
            bar = bars.get(step)
            if bar is None:
                bar = bars[step] = tqdm(total=total, desc=labels.get(step, step),
                                        unit=" entries", leave=False)
            bar.update(done - bar.n)

        return progress
