"""What the benchmarks share: a scratch PostgreSQL database next to DATABASE_URL's,
dropped at the end, and timing one call."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Seconds `fn()` took, and what it returned."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def use_scratch_database(suffix: str, *, script: str, reuse: bool = False) -> None:
    """Create `<name>_<suffix>` (or, with `reuse`, keep the one a previous run left) and
    point DATABASE_URL at it, before Django is set up."""
    import psycopg

    base = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/spamviewer")
    if not base.startswith("postgres"):
        raise SystemExit(f"{script} needs DATABASE_URL to point at PostgreSQL")
    server, _, name = base.rpartition("/")
    bench_name = f"{name.split('?')[0]}_{suffix}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [bench_name]
        ).fetchone()
        if reuse and not exists:
            raise SystemExit(f"--reuse: there is no database {bench_name}; run with --keep first")
        if not reuse:
            conn.execute(f'DROP DATABASE IF EXISTS "{bench_name}"')
            conn.execute(f'CREATE DATABASE "{bench_name}"')
    os.environ["DATABASE_URL"] = f"{server}/{bench_name}"
    os.environ["BENCH_ADMIN_URL"] = f"{server}/postgres"
    os.environ["BENCH_DB_NAME"] = bench_name


def drop_scratch_database() -> None:
    import psycopg
    from django.db import connections

    connections.close_all()
    with psycopg.connect(os.environ["BENCH_ADMIN_URL"], autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{os.environ["BENCH_DB_NAME"]}"')
