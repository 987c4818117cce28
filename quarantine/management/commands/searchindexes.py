"""Build the PostgreSQL trigram indexes of the message list's search.

The migration that adds them goes on without them when the pg_trgm extension can be
neither found nor created; once an administrator has run `CREATE EXTENSION pg_trgm`, this
builds them (concurrently: mail keeps being quarantined meanwhile). Running it again
rebuilds them.
"""

from __future__ import annotations

import importlib

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, connection

_migration = importlib.import_module("quarantine.migrations.0002_search_trigram_indexes")


class Command(BaseCommand):
    help = (
        "Build the search's trigram indexes on PostgreSQL (after CREATE EXTENSION pg_trgm, "
        "where the migration could not create the extension)."
    )

    def handle(self, *args, **options) -> None:
        if connection.vendor != "postgresql":
            raise CommandError(
                f"the search indexes are for PostgreSQL; this database is {connection.vendor}"
            )
        with connection.cursor() as cursor:
            if not _migration.has_trigram_extension(cursor):
                try:
                    cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
                except DatabaseError as exc:
                    raise CommandError(
                        f"the PostgreSQL extension pg_trgm is missing and cannot be created "
                        f"({str(exc).strip()}): run CREATE EXTENSION pg_trgm as a superuser "
                        "in this database, then this command again"
                    ) from exc
        with connection.schema_editor(atomic=False) as editor:
            _migration.create_trigram_indexes(None, editor)
        names = ", ".join(name for name, _table, _column in _migration.TRIGRAM_INDEXES)
        self.stdout.write(f"search indexes built: {names}")
