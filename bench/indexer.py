"""The indexer on a large store, in PostgreSQL.

    .venv/bin/python bench/indexer.py [--files 100000] [--json]

Writes FILES amavisd-new style quarantine files (spam gzipped, the other categories plain,
one level of sub-directories, 3 KB to 6 KB each) into a temporary store, then, in a
scratch database (`<name>_bench_indexer` next to DATABASE_URL's, dropped at the end),
times `index_directory()`:

- the first run (every file parsed, every row inserted),
- a second run with nothing changed (only the listing and the size/mtime comparison),
- a run after 1 % of the files were added and 1 % removed.

Two baselines are measured in the same run on the same files: listing the store with a
stat of every file (what an unchanged run cannot avoid), and reading the first 32 KB of
every file, inflating the gzipped ones (the least a first run must read). Goals: first run
under 60 s, unchanged run under 2 s. `--json` prints one JSON line at the end for
scripts/run-bench.sh.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

# bench/ is the script's own directory, first on sys.path.
from common import drop_scratch_database, timed, use_scratch_database

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CATEGORIES = ["SPAM", "SPAM", "SPAM", "BANNED", "VIRUS", "BADH"]
FIRST_RUN_GOAL_S = 60.0
UNCHANGED_GOAL_S = 2.0


def _message(i: int, when: datetime, rng: random.Random) -> bytes:
    body_lines = rng.randint(40, 90)
    body = "".join(f"Line {n} of message {i}: cheap offers, act now, limited time.\n"
                   for n in range(body_lines))
    return (
        f"Received: from mx{i % 50}.remote.example "
        f"(mx{i % 50}.remote.example [192.0.2.{i % 250}])\n"
        f"\tby gateway.example.test with ESMTP id {i:08X}; {format_datetime(when)}\n"
        f"From: Sender {i % 5000} <sender{i % 5000}@remote.example>\n"
        f"To: user{i % 1000}@example.test\n"
        f"Subject: Offer number {i} for you\n"
        f"Date: {format_datetime(when)}\n"
        f"Message-ID: <{i}@remote.example>\n"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n"
        f"{body}"
    ).encode()


def _write_files(store_root: Path, start: int, count: int) -> list[Path]:
    """COUNT quarantine files, written plainly (no fsync: this is set-up, not the test)."""
    from quarantine.store import FileStore, build_envelope_block, generate_mail_id

    store = FileStore(store_root)
    rng = random.Random(start)
    epoch = datetime(2026, 1, 1, tzinfo=UTC)
    written = []
    for i in range(start, start + count):
        category = CATEGORIES[i % len(CATEGORIES)]
        mail_id, _ = generate_mail_id()
        when = epoch + timedelta(seconds=i * 7)
        findings = [("X-Spam-Status", f"Yes, score={rng.uniform(5, 30):.3f} tests=[BAYES_99]")]
        payload = build_envelope_block(
            category=category, mail_id=mail_id, sender=f"sender{i % 5000}@remote.example",
            recipients=[f"user{i % 1000}@example.test"], findings=findings,
        ) + _message(i, when, rng)
        path = store.path(store.key_for(category, mail_id))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith(".gz"):
            payload = gzip.compress(payload, compresslevel=6, mtime=0)
        path.write_bytes(payload)
        written.append(path)
    return written


def _baseline_list(store_root: Path) -> int:
    from quarantine.store import FileStore

    return sum(1 for _ in FileStore(store_root).iter_files())


def _baseline_read(store_root: Path) -> int:
    from quarantine.store import FileStore

    store = FileStore(store_root)
    total = 0
    for key, _ in store.iter_files():
        with open(store.path(key), "rb") as f:
            if key.endswith(".gz"):
                with gzip.GzipFile(fileobj=f) as gz:
                    total += len(gz.read(32 * 1024))
            else:
                total += len(f.read(32 * 1024))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON line with the results at the end")
    args = parser.parse_args()

    use_scratch_database("bench_indexer", script="bench/indexer.py")
    work = Path(tempfile.mkdtemp(prefix="sv-bench-indexer-"))
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "spamviewer.settings",
        "SPAMVIEWER_IGNORE_DOTENV": "True",
        "SPAMVIEWER_VAR_DIR": str(work / "var"),
        "LOG_LEVEL": "WARNING",
    })
    import django

    django.setup()
    from django.core.management import call_command

    from quarantine.indexer import index_directory

    store_root = work / "store"
    try:
        call_command("migrate", verbosity=0)
        print(f"writing {args.files:,} store files ...", flush=True)
        setup_s, files = timed(lambda: _write_files(store_root, 0, args.files))
        print(f"  written in {setup_s:.1f} s", flush=True)
        # Both baselines twice: the first pass warms the page cache for everything after.
        _baseline_read(store_root)
        list_s, listed = timed(lambda: _baseline_list(store_root))
        read_s, _ = timed(lambda: _baseline_read(store_root))
        first_s, first = timed(lambda: index_directory(store_root))
        again_s, again = timed(lambda: index_directory(store_root))
        churn = max(1, args.files // 100)
        for path in random.Random(1).sample(files, churn):
            path.unlink()
        _write_files(store_root, args.files, churn)
        churn_s, churned = timed(lambda: index_directory(store_root))
    finally:
        drop_scratch_database()
        shutil.rmtree(work, ignore_errors=True)

    cores = os.cpu_count()
    print(f"# indexer on {listed:,} store files (PostgreSQL), {cores} cores")
    print(f"baseline: list and stat every file        {list_s:8.2f} s")
    print(f"baseline: read 32 KB of every file        {read_s:8.2f} s")
    print(f"  first run            {first_s:8.2f} s   x{first_s / read_s:6.1f} of read   ({first})")
    print(f"  unchanged run        {again_s:8.2f} s   x{again_s / list_s:6.1f} of list   ({again})")
    print(f"  1 % added, 1 % gone  {churn_s:8.2f} s   x{churn_s / list_s:6.1f} of list   "
          f"({churned})")
    print(f"goals: first run under {FIRST_RUN_GOAL_S:.0f} s: "
          f"{'met' if first_s < FIRST_RUN_GOAL_S else 'NOT met'}; unchanged run under "
          f"{UNCHANGED_GOAL_S:.0f} s: {'met' if again_s < UNCHANGED_GOAL_S else 'NOT met'}")
    if args.json:
        print(json.dumps({
            "bench": "indexer",
            "title": f"Indexer, {listed:,} store files (PostgreSQL)",
            "cores": cores,
            "results": [
                {"name": "first run", "value": round(first_s, 3), "unit": "s",
                 "baseline_name": "read 32 KB of every file", "baseline": round(read_s, 3),
                 "goal": f"< {FIRST_RUN_GOAL_S:.0f} s", "met": first_s < FIRST_RUN_GOAL_S},
                {"name": "unchanged re-run", "value": round(again_s, 3), "unit": "s",
                 "baseline_name": "list and stat every file", "baseline": round(list_s, 3),
                 "goal": f"< {UNCHANGED_GOAL_S:.0f} s", "met": again_s < UNCHANGED_GOAL_S},
                {"name": "re-run, 1 % added and 1 % removed", "value": round(churn_s, 3),
                 "unit": "s", "baseline_name": "list and stat every file",
                 "baseline": round(list_s, 3)},
            ],
        }))


if __name__ == "__main__":
    main()
