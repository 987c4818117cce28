"""Apply the quarantine's age and size limits now (Celery beat runs the same function)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from quarantine.retention import prune_quarantine


class Command(BaseCommand):
    help = (
        "Delete quarantined messages older than QUARANTINE_MAX_AGE_DAYS, then the oldest "
        "while the store is larger than QUARANTINE_MAX_SIZE_MB; remove stale temporary files."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--max-age-days", type=int, help="override QUARANTINE_MAX_AGE_DAYS")
        parser.add_argument("--max-size-mb", type=int, help="override QUARANTINE_MAX_SIZE_MB")

    def handle(self, *args, **options) -> None:
        summary = prune_quarantine(
            max_age_days=options["max_age_days"], max_size_mb=options["max_size_mb"]
        )
        self.stdout.write(str(summary))
