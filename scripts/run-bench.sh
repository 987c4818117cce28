#!/usr/bin/env bash
# `make bench`: runs every benchmark under bench/ and writes BENCHMARKS.md.
#
# Each bench/*.py prints a human-readable report and, with --json, one JSON line at the end
# ({"bench": ..., "results": [{"name", "value", "unit", "baseline", ...}]}); this script
# collects those lines and renders them, each figure beside the baseline measured in the
# same run. The PostgreSQL benchmarks use scratch databases next to DATABASE_URL's
# (default postgresql://postgres@127.0.0.1:5432/spamviewer) and drop them at the end.
#
# amavisd-new is measured beside the filter: when it is not installed this script installs
# the Debian package (services kept from starting, as scripts/install-apt.sh does) and runs
# its own amavisd with a private configuration on loopback ports, forwarding to a private
# smtp-sink. BENCH_NO_AMAVIS=1 skips it; BENCH_ONLY="indexer list_page" runs a subset
# (the other sections of BENCHMARKS.md are kept, marked with the run they come from);
# BENCH_FILTER_MESSAGES, BENCH_LIST_ROWS, BENCH_INDEXER_FILES and BENCH_DIRECTORY_OBJECTS
# change the sizes (the defaults are the ones the goals are set for).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
export PATH="$ROOT/.venv/bin:$PATH:/usr/sbin:/sbin"
export SPAMVIEWER_IGNORE_DOTENV=1
export DATABASE_URL=${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/spamviewer}
OUT=$ROOT/BENCHMARKS.md

work=$(mktemp -d /tmp/sv-bench-run-XXXXXX)
chmod 711 "$work"   # amavisd runs as its own user below
results=$work/results.jsonl
: >"$results"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  if [ -f "$work/amavis/amavisd.pid" ]; then
    kill "$(cat "$work/amavis/amavisd.pid")" 2>/dev/null
    sleep 1
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() {
  local port=$1 tries=${2:-100}
  for _ in $(seq "$tries"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

wanted() {
  [ -z "${BENCH_ONLY:-}" ] || [[ " $BENCH_ONLY " == *" $1 "* ]]
}

# run_bench NAME ARGS...: runs bench/NAME.py --json ARGS, keeps its JSON line (or a line
# saying why there is none).
run_bench() {
  local name=$1; shift
  wanted "$name" || return 0
  echo "=== bench/$name.py $*"
  local log=$work/$name.log started=$SECONDS
  "$PY" "bench/$name.py" --json "$@" 2>&1 | tee "$log"
  local status=${PIPESTATUS[0]}
  local line
  line=$(grep '^{"bench"' "$log" | tail -n 1)
  if [ "$status" -eq 0 ] && [ -n "$line" ]; then
    printf '%s\n' "$line" >>"$results"
  else
    BENCH_NAME=$name BENCH_STATUS=$status BENCH_LOG=$log "$PY" - >>"$results" <<'PY'
import json, os
tail = open(os.environ["BENCH_LOG"], errors="replace").read().strip().splitlines()[-5:]
print(json.dumps({"bench": os.environ["BENCH_NAME"], "error":
                  f"exit status {os.environ['BENCH_STATUS']}", "log": tail}))
PY
  fi
  echo "    ($((SECONDS - started)) s)"
}

# --- amavisd-new on private loopback ports ----------------------------------------------
amavis_note=""
start_amavis() {
  local bin
  bin=$(command -v amavisd-new || command -v amavisd || true)
  if [ -z "$bin" ]; then
    echo "=== installing amavisd-new (Debian package) for the comparison"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    local policy_added=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
      $sudo chmod +x /usr/sbin/policy-rc.d
      policy_added=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
      amavisd-new >"$work/apt.log" 2>&1 \
      || { $sudo apt-get update -q >>"$work/apt.log" 2>&1 \
           && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
                --no-install-recommends amavisd-new >>"$work/apt.log" 2>&1; }
    [ -n "$policy_added" ] && $sudo rm -f /usr/sbin/policy-rc.d
    bin=$(command -v amavisd-new || command -v amavisd || true)
    if [ -z "$bin" ]; then
      amavis_note="amavisd-new could not be installed: $(tail -n 1 "$work/apt.log")"
      return 1
    fi
  fi
  if [ "$(id -u)" -ne 0 ] && ! id amavis >/dev/null 2>&1; then
    amavis_note="amavisd-new needs root (or the amavis user) to start"
    return 1
  fi
  local home=$work/amavis sink_port port
  sink_port=$(free_port)
  port=$(free_port)
  local conf=$work/amavis-conf/amavisd.conf
  mkdir -p "$home/tmp" "$home/db" "$home/quarantine" "$work/amavis-conf"
  smtp-sink -u postfix "127.0.0.1:$sink_port" 1024 >/dev/null 2>&1 &
  pids+=($!)
  # The same work as the filter's default profile: MIME decoding, banned names and bad
  # headers. No virus scanner and no SpamAssassin, as the default profile asks neither.
  cat >"$conf" <<EOF
use strict;
\$MYHOME = '$home';
\$TEMPBASE = "\$MYHOME/tmp";
\$db_home = "\$MYHOME/db";
\$QUARANTINEDIR = "\$MYHOME/quarantine";
\$pid_file = "\$MYHOME/amavisd.pid";
\$lock_file = "\$MYHOME/amavisd.lock";
\$daemon_user = 'amavis';
\$daemon_group = 'amavis';
\$mydomain = 'bench.test';
\$myhostname = 'amavis.bench.test';
\$inet_socket_bind = '127.0.0.1';
\$inet_socket_port = $port;
@inet_acl = qw(127.0.0.1);
\$forward_method = 'smtp:[127.0.0.1]:$sink_port';
\$notify_method = \$forward_method;
\$max_servers = 10;
\$max_requests = 1000;
\$child_timeout = 120;
@local_domains_maps = (['.example.test', '.bench.test']);
@bypass_virus_checks_maps = (1);
@bypass_spam_checks_maps = (1);
@av_scanners = ();
@av_scanners_backup = ();
\$enable_dkim_verification = 0;
\$enable_dkim_signing = 0;
\$enable_zmq = 0;
\$do_syslog = 0;
\$LOGFILE = "\$MYHOME/amavis.log";
\$log_level = 0;
1;
EOF
  # amavisd refuses a configuration (or its directory) that its own user could change.
  chown -R amavis:amavis "$home" 2>/dev/null || true
  chmod 0755 "$work/amavis-conf"
  chmod 0644 "$conf"
  "$bin" -c "$conf" >"$work/amavisd.out" 2>&1
  if ! wait_port "$port" 300; then
    amavis_note="amavisd-new did not start: $(tail -n 3 "$work/amavisd.out" "$home/amavis.log" 2>/dev/null | tr '\n' ' ')"
    return 1
  fi
  AMAVIS_PORT=$port
  amavis_note="amavisd-new $(dpkg-query -W -f='${Version}' amavisd-new 2>/dev/null) on 127.0.0.1:$port, \$max_servers 10, virus and spam checks off, forwarding to its own smtp-sink"
}

# --- the benchmarks ---------------------------------------------------------------------
started_at=$(date -u '+%Y-%m-%d %H:%M UTC')
filter_args=()
if wanted filter_throughput && [ -z "${BENCH_NO_AMAVIS:-}" ]; then
  if start_amavis; then
    filter_args=(--amavis "127.0.0.1:$AMAVIS_PORT")
  fi
  echo "amavisd-new: $amavis_note"
fi
run_bench filter_throughput --messages "${BENCH_FILTER_MESSAGES:-10000}" "${filter_args[@]}"
if [ -f "$work/amavis/amavis.log" ]; then
  # What amavisd did with the load: it should have passed every message.
  amavis_note="$amavis_note; its log: $(grep -Ec 'Blocked|TEMPFAIL|REJECT' "$work/amavis/amavis.log") lines of blocked or refused mail"
fi
run_bench list_page --rows "${BENCH_LIST_ROWS:-1000000}"
run_bench indexer --files "${BENCH_INDEXER_FILES:-100000}"
run_bench directory_sync --objects "${BENCH_DIRECTORY_OBJECTS:-50000}"

# --- BENCHMARKS.md ------------------------------------------------------------------------
BENCH_RESULTS=$results BENCH_OUT=$OUT BENCH_STARTED=$started_at BENCH_AMAVIS=$amavis_note \
  "$PY" - <<'PY'
import json
import os
import platform
import subprocess
from pathlib import Path


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return f"{os.cpu_count()} cores ({cpu}), {mem_kb / 1024 / 1024:.1f} GiB RAM"


def postgres() -> str:
    try:
        import psycopg

        url = os.environ["DATABASE_URL"]
        server = url.rpartition("/")[0]
        with psycopg.connect(f"{server}/postgres", connect_timeout=3) as conn:
            return conn.execute("SHOW server_version").fetchone()[0]
    except Exception as exc:  # noqa: BLE001 (only for the report header)
        return f"unknown ({exc.__class__.__name__})"


def fmt(value, unit) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value >= 100:
        value = f"{value:,.0f}"
    return f"{value} {unit}"


records = [json.loads(line) for line in Path(os.environ["BENCH_RESULTS"]).read_text().splitlines()
           if line.strip()]
out = [
    "# Benchmarks",
    "",
    "Written by `make bench` (scripts/run-bench.sh), which runs every script under `bench/`;",
    "each figure stands beside a baseline measured in the same run on the same machine.",
    "",
    f"- run: {os.environ['BENCH_STARTED']}",
    f"- machine: {machine()}, {platform.system()} {platform.release()}",
    f"- Python {platform.python_version()}, PostgreSQL {postgres()}",
    "",
]
for record in records:
    title = record.get("title", record["bench"])
    out += [f"## {title}", "", f"`bench/{record['bench']}.py`", ""]
    if "error" in record:
        out += [f"Not measured: {record['error']}.", "", "```", *record.get("log", []), "```", ""]
        continue
    lat = any("p95" in r for r in record["results"])
    if lat:
        out += ["| request | p50 | p95 | baseline p50 / p95 | p50 / baseline | goal | met |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
    else:
        out += ["| measure | result | baseline | result / baseline | goal | met |",
                "| --- | --- | --- | --- | --- | --- |"]
    for r in record["results"]:
        base = r.get("baseline")
        ratio = f"{r['value'] / base:.2f}" if base else ""
        met = {True: "yes", False: "**no**"}.get(r.get("met"), "")
        goal = r.get("goal", "")
        if lat:
            out.append(f"| {r['name']} | {r['value']} ms | {r['p95']} ms | "
                       f"{r.get('baseline_name', '')}: {base} / {r.get('baseline_p95')} ms | "
                       f"{ratio} | {goal} | {met} |")
        else:
            baseline = f"{r.get('baseline_name', '')}: {fmt(base, r['unit'])}" if base else ""
            out.append(f"| {r['name']} | {fmt(r['value'], r['unit'])} | {baseline} | {ratio} | "
                       f"{goal} | {met} |")
    out.append("")
    if record["bench"] == "filter_throughput":
        out += [f"amavisd-new: {os.environ.get('BENCH_AMAVIS') or 'not measured'}.", ""]
# With BENCH_ONLY, the sections of the benchmarks not run now stay as they were, each
# saying which run it comes from.
previous = Path(os.environ["BENCH_OUT"])
if os.environ.get("BENCH_ONLY") and previous.exists():
    text = previous.read_text()
    old_run = next((line[len("- run: "):] for line in text.splitlines()
                    if line.startswith("- run: ")), "an earlier run")
    ran = {record["bench"] for record in records}
    for section in text.split("\n## ")[1:]:
        lines = section.rstrip("\n").splitlines()
        name = next((line.strip("`")[len("bench/"):-len(".py")] for line in lines
                     if line.startswith("`bench/")), None)
        if name is None or name in ran:
            continue
        if not any(line.startswith("Measured in the run of ") for line in lines):
            lines.insert(1, "")
            lines.insert(2, f"Measured in the run of {old_run}.")
        out += [f"## {lines[0]}", *lines[1:], ""]
tmp = Path(os.environ["BENCH_OUT"]).with_name("BENCHMARKS.tmp")
tmp.write_text("\n".join(out))
tmp.replace(os.environ["BENCH_OUT"])
print(f"wrote {os.environ['BENCH_OUT']}")
PY
