"""The message list and search at a large quarantine, in PostgreSQL.

    .venv/bin/python bench/list_page.py [--rows 1000000] [--requests 200] [--keep] [--reuse]

Fills a scratch database (`<name>_bench` next to DATABASE_URL's, dropped at the end unless
`--keep`; `--reuse` times a database kept by an earlier run without filling it again) with
ROWS messages spread over 1,000 addresses, then times server-side requests through Django's
test client: a user's list, a user's next page (keyset cursor), a user's search, vadmin's
list and vadmin's search. The baseline is `/healthz` (one request through the same
middleware and one trivial query) measured in the same run; every figure is printed beside
it as a ratio. Goals: list p95 under 50 ms, search p95 under 200 ms.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

# bench/ is the script's own directory, first on sys.path.
from common import drop_scratch_database, use_scratch_database

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADDRESSES = 1000
CATEGORIES = ["SPAM", "SPAM", "SPAM", "BANNED", "VIRUS", "BADH"]


def _fill(rows: int) -> None:
    """COPY rows straight into the tables: the ORM would take longer than the benchmark."""
    from django.contrib.auth.models import User
    from django.db import connection

    from directory.models import Address

    user = User.objects.create_user("user0", password="bench-password-0")
    User.objects.create_superuser("vadmin", password="bench-password-v")
    Address.objects.create(address="user0@example.test", user=user)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    msg_buf = io.StringIO()
    rcpt_buf = io.StringIO()
    for i in range(1, rows + 1):
        when = (start + timedelta(seconds=i * 7)).isoformat()
        cat = CATEGORIES[i % len(CATEGORIES)]
        subject = f"Offer number {i} for you" if i % 97 else f"Quarterly invoice {i}"
        msg_buf.write(
            f"{i}\tm{i:011d}\t{cat}\tsender{i % 5000}@remote.example\t"
            f"Sender {i % 5000} <sender{i % 5000}@remote.example>\t"
            f"user{i % ADDRESSES}@example.test\t"
            f"{subject}\t{when}\t{when}\t4096\t\\N\t\t/bench\tx/m{i:011d}\t4200\t0\n"
        )
        rcpt_buf.write(f"{i}\tuser{i % ADDRESSES}@example.test\t{when}\t{cat}\n")
    with connection.cursor() as cursor:
        raw = cursor.connection
        with raw.cursor().copy(
            "COPY quarantine_message (id, mail_id, category, envelope_sender, from_header, "
            "to_header, subject, date, received_at, size, spam_score, reasons, origin, "
            "storage_key, file_size, file_mtime_ns) FROM STDIN"
        ) as copy:
            copy.write(msg_buf.getvalue())
        with raw.cursor().copy(
            "COPY quarantine_recipient (message_id, address, received_at, category) FROM STDIN"
        ) as copy:
            copy.write(rcpt_buf.getvalue())
        cursor.execute("SELECT setval('quarantine_message_id_seq', %s)", [rows])
        cursor.execute("ANALYZE")


def _time(client, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        response = client.get(url)
        out.append((time.perf_counter() - t0) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"{url} answered {response.status_code}")
    return out


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--keep", action="store_true",
                        help="leave the filled database in place for a later --reuse")
    parser.add_argument("--reuse", action="store_true",
                        help="time the database a --keep run left; --rows is then ignored")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON line with the results at the end")
    args = parser.parse_args()

    use_scratch_database("bench", script="bench/list_page.py", reuse=args.reuse)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "spamviewer.settings")
    os.environ["SPAMVIEWER_IGNORE_DOTENV"] = "1"
    import tempfile

    static_root = tempfile.mkdtemp(prefix="bench-static-")
    os.environ["STATIC_ROOT"] = static_root
    import django

    django.setup()
    from django.core.management import call_command
    from django.test import Client

    try:
        call_command("migrate", verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        t0 = time.perf_counter()
        if args.reuse:
            from quarantine.models import Message

            args.rows = Message.objects.count()
        else:
            _fill(args.rows)
        fill_s = time.perf_counter() - t0

        from django.test.utils import setup_test_environment

        setup_test_environment()
        from django.conf import settings

        settings.ALLOWED_HOSTS = ["testserver"]
        user = Client()
        assert user.login(username="user0", password="bench-password-0")
        admin = Client()
        assert admin.login(username="vadmin", password="bench-password-v")
        first = user.get("/")
        context = first.context or {}
        older = f"/?{context['older_query']}" if context.get("older_query") else None
        cases = [
            ("baseline /healthz", user, "/healthz"),
            ("user list, first page", user, "/"),
            ("user search 'invoice'", user, "/?q=invoice"),
            ("vadmin list, first page", admin, "/"),
            ("vadmin search 'invoice'", admin, "/?q=invoice"),
            # 1,000 messages and their 1,000 rows: To header and recipient address.
            ("vadmin search 'user12@'", admin, "/?q=user12@"),
            # No row matches: every row of the scope is read (the worst case).
            ("user search, no match", user, "/?q=zzzznomatch"),
            ("vadmin search, no match", admin, "/?q=zzzznomatch"),
        ]
        if older:
            cases.insert(2, ("user list, next page", user, older))
        results = []
        for label, client, url in cases:
            _time(client, url, 5)  # warm caches and connections
            results.append((label, _time(client, url, args.requests)))
        base_p50 = statistics.median(results[0][1])
        filled = "reused" if args.reuse else f"filled in {fill_s:.1f} s"
        print(f"# list page at {args.rows:,} messages (PostgreSQL), {os.cpu_count()} cores; "
              f"{filled}")
        print(f"{'request':28} {'p50 ms':>8} {'p95 ms':>8} {'p50/baseline':>13}")
        for label, values in results:
            p50, p95 = statistics.median(values), _pct(values, 95)
            print(f"{label:28} {p50:8.2f} {p95:8.2f} {p50 / base_p50:12.1f}x")
        if args.json:
            _print_json(args.rows, results)
    finally:
        if args.keep:
            from django.db import connections

            connections.close_all()
            print(f"# kept database {os.environ['BENCH_DB_NAME']}")
        else:
            drop_scratch_database()
        import shutil

        shutil.rmtree(static_root, ignore_errors=True)


def _print_json(rows: int, results: list[tuple[str, list[float]]]) -> None:
    """One line for scripts/run-bench.sh: each request's p50/p95 beside the baseline's."""
    import json

    base = results[0][1]
    out = []
    for label, values in results[1:]:
        goal = 50.0 if "list" in label else 200.0
        p95 = _pct(values, 95)
        out.append({"name": label, "value": round(statistics.median(values), 2),
                    "p95": round(p95, 2), "unit": "ms", "baseline_name": results[0][0],
                    "baseline": round(statistics.median(base), 2),
                    "baseline_p95": round(_pct(base, 95), 2),
                    "goal": f"p95 < {goal:.0f} ms", "met": p95 < goal})
    print(json.dumps({"bench": "list_page", "cores": os.cpu_count(),
                      "title": f"List page and search, {rows:,} messages (PostgreSQL)",
                      "results": out}))


if __name__ == "__main__":
    main()
