"""Index amavisd-new style quarantine directories into the message list."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from quarantine.indexer import index_directory
from quarantine.store import StoreError
from quarantine.tasks import IndexFailed, index_quarantine_task


class Command(BaseCommand):
    help = (
        "Index quarantine directories (flat or with one level of sub-directories): new "
        "files are added, changed ones refreshed, rows of vanished files removed."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "directories", nargs="*", metavar="DIR",
            help="directories to index (default: QUARANTINE_DIR)",
        )
        parser.add_argument(
            "--async", action="store_true", dest="run_async",
            help="hand the work to a Celery worker instead of doing it here",
        )

    def handle(self, *args, **options) -> None:
        directories = options["directories"] or [str(settings.QUARANTINE_DIR)]
        if options["run_async"]:
            try:
                # Without a broker (CELERY_TASK_ALWAYS_EAGER) the task runs here and now.
                index_quarantine_task.delay(directories)
            except IndexFailed as exc:
                raise CommandError(str(exc)) from exc
            self.stdout.write(f"queued indexing of {', '.join(directories)}")
            return
        failed = []
        for directory in directories:
            bar = tqdm(unit="file", desc=directory) if self.stdout.isatty() else None
            try:
                summary = index_directory(directory, progress=_updater(bar) if bar else None)
            except StoreError as exc:
                self.stderr.write(f"not indexed: {exc}")
                failed.append(directory)
                continue
            finally:
                if bar is not None:
                    bar.close()
            # Each file that could not be indexed, by name: the run itself went on.
            for error in summary.errors:
                self.stderr.write(error)
            self.stdout.write(str(summary))
        if failed:
            raise CommandError(f"cannot read {', '.join(failed)}")


def _updater(bar: tqdm):
    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return update
