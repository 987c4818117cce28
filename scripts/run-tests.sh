#!/usr/bin/env bash
# Runs every test: lint, then the whole pytest suite on PostgreSQL (127.0.0.1:5432).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
export PATH="$PWD/$VENV/bin:$PATH"

"$VENV/bin/ruff" check . || exit 1

if [ -z "${DATABASE_URL:-}" ]; then
  if "$VENV/bin/python" - <<'PY'
import sys, psycopg
try:
    psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=3).close()
except Exception as exc:
    print(f"PostgreSQL at 127.0.0.1:5432 is not reachable ({exc})", file=sys.stderr)
    sys.exit(1)
PY
  then
    export DATABASE_URL="postgresql://postgres@127.0.0.1:5432/spamviewer"
  else
    echo "Running the suite on SQLite instead: start PostgreSQL to test against it." >&2
  fi
fi
echo "Database for the tests: ${DATABASE_URL:-sqlite (in memory)}"

# The tests make their own state; keep the developer's var/ and .env out of it.
export SPAMVIEWER_VAR_DIR="$(mktemp -d)"
export SPAMVIEWER_IGNORE_DOTENV=1
trap 'rm -rf "$SPAMVIEWER_VAR_DIR"' EXIT

"$VENV/bin/python" -m pytest "$@"
status=$?
if [ $status -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit $status
