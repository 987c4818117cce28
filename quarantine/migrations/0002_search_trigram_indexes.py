"""Trigram indexes for the message list's search, in PostgreSQL only.

The search is a case-insensitive substring match (`icontains`, which PostgreSQL runs as
`UPPER(column::text) LIKE UPPER('%term%')`) on the Subject, From and To headers and on the
recipient address. A B-tree cannot answer a match in the middle of a string; a GIN index
of the pg_trgm extension over the same `UPPER(column::text)` expression can, for terms of
three characters or more.

The pg_trgm extension ships with PostgreSQL (package postgresql-contrib on some systems)
and is a trusted extension: the owner of the database may create it without being a
superuser. Where the database user may not create it, an administrator runs, once:

    CREATE EXTENSION pg_trgm;

If the extension can be neither found nor created, this migration logs a warning and
completes without the indexes: search still works, but a search over the whole quarantine
reads every row. To add the indexes later, create the extension and then run

    manage.py searchindexes

(not a migration back to 0001: that would also undo the later migrations and drop what
they keep, such as the deletions still to be done).

The indexes are built with CREATE INDEX CONCURRENTLY, so mail keeps being quarantined
while they are built; the migration therefore runs outside a transaction. SQLite and
other databases get nothing from this migration.
"""

import logging

from django.db import DatabaseError, migrations

logger = logging.getLogger("quarantine.migrations")

# (index name, table, column): each indexes the expression icontains compares.
TRIGRAM_INDEXES = [
    ("message_subject_trgm", "quarantine_message", "subject"),
    ("message_from_trgm", "quarantine_message", "from_header"),
    ("message_to_trgm", "quarantine_message", "to_header"),
    ("rcpt_address_trgm", "quarantine_recipient", "address"),
]


PENDING_LIST_KB = 256


def has_trigram_extension(cursor) -> bool:
    cursor.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'")
    return cursor.fetchone() is not None


def create_trigram_indexes(apps, schema_editor):
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        if not has_trigram_extension(cursor):
            try:
                cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
            except DatabaseError as exc:
                logger.warning(
                    "Could not create the PostgreSQL extension pg_trgm (%s). The search "
                    "indexes are not built and a search over the whole quarantine will be "
                    "slow. Run CREATE EXTENSION pg_trgm as a superuser, then "
                    "'manage.py searchindexes'.",
                    str(exc).strip(),
                )
                return
        for name, table, column in TRIGRAM_INDEXES:
            # A concurrent build that failed leaves an invalid index of the same name.
            cursor.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
            # New rows wait in the index's pending list until it is merged in, and every
            # search reads the whole list: a small one keeps searches fast between merges.
            cursor.execute(
                f'CREATE INDEX CONCURRENTLY "{name}" ON "{table}" '
                f'USING gin ((UPPER("{column}"::text)) gin_trgm_ops) '
                f"WITH (gin_pending_list_limit = {PENDING_LIST_KB})"
            )
        # The planner estimates how many rows a search term matches from the statistics
        # of the indexed expressions, which only ANALYZE gathers.
        cursor.execute("ANALYZE quarantine_message, quarantine_recipient")


def drop_trigram_indexes(apps, schema_editor):
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        for name, _table, _column in TRIGRAM_INDEXES:
            cursor.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("quarantine", "0001_initial"),
    ]

    operations = [
        migrations.RunPython(create_trigram_indexes, drop_trigram_indexes, elidable=False),
    ]
