"""Messages a second through the filter worker, against the same load sent straight to
the next hop (the ceiling), with Postfix's own load tools.

    .venv/bin/python bench/filter_throughput.py [--messages 10000] [--processes 1 2 4]

Needs Postfix's smtp-source and smtp-sink (Debian package postfix). Starts smtp-sink (the
next hop) and `manage.py runfilter` with the default policy (the local checks of the
default profile) on loopback, then, for 4 KB and 100 KB messages and 10 and 20 parallel
sessions, sends MESSAGES messages (100 KB: a fifth as many) with smtp-source straight to
smtp-sink and then through the worker, and prints both rates and their ratio. With one
and two processes it also sends two messages shaped like most business mail (a 12 KB
multipart/alternative, and the same with a 50 KB PDF attached), 20 sessions. Each worker
count given to --processes (FILTER_PROCESSES, processes sharing the port with
SO_REUSEPORT) gets its own run. Beside each rate it prints the worker's CPU time per
message (all its processes): smtp-source and smtp-sink share the machine with it, and on
a busy machine the CPU time says more than the rate. `--repeat N` (3) measures each pair
N times and keeps the best rate of each side: a run of a second or two on a shared
machine varies by a third. Finally it measures the worker's resident memory (all its
processes) while smtp-source keeps 100 sessions open. The same 4 KB loads also go through
bench/minimal_relay.py, a relay with no checks and no limits: the most a Python worker
could reach on the machine, for reading the worker's ratio against. amavisd-new is
measured beside it when a running amavisd listens on --amavis (host:port); otherwise the
line says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the worker should reach: half the ceiling for 4 KB messages, memory flat.
GOAL_RATIO = 0.5
GOAL_RSS_MB = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def _source(port: int, *, messages: int, sessions: int, size: int = 0,
            file: Path | None = None) -> float:
    """Messages a second smtp-source managed (each session reuses its connection): `size`
    bytes of filler text, or the message in `file`."""
    content = ["-F", str(file)] if file is not None else ["-l", str(size)]
    started = time.perf_counter()
    subprocess.run(
        ["smtp-source", "-d", "-s", str(sessions), "-m", str(messages), *content,
         "-f", "bench@remote.example", "-t", "user@example.test", f"127.0.0.1:{port}"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return messages / (time.perf_counter() - started)


def _typical_mail(directory: Path) -> list[tuple[str, Path]]:
    """Two messages shaped like most business mail, written once: a 12 KB
    multipart/alternative (text and HTML, quoted-printable) and the same with a 50 KB PDF
    attached (80 KB, multipart/mixed). smtp-source sends each line with CRLF."""
    import random
    from email.message import EmailMessage

    words = ("the quarterly report numbers meeting invoice attached please find next "
             "steps budget review team update schedule").split()
    chance = random.Random(4)

    def paragraph() -> str:
        return " ".join(chance.choice(words) for _ in range(80))

    def alternative() -> EmailMessage:
        message = EmailMessage()
        message["From"] = "Alice Example <alice@remote.example>"
        message["To"] = "user@example.test"
        message["Subject"] = "Quarterly report and next steps"
        message["Date"] = "Fri, 20 Nov 2026 10:00:00 +0000"
        message["Message-ID"] = "<bench.1@remote.example>"
        message.set_content("\n\n".join(paragraph() for _ in range(8)),
                            cte="quoted-printable")
        html = "".join(f"<p style='font-family:Arial'>{paragraph()}</p>" for _ in range(12))
        message.add_alternative(f"<html><body>{html}</body></html>", subtype="html",
                                cte="quoted-printable")
        return message

    mixed = alternative()
    mixed.add_attachment(chance.randbytes(50_000), maintype="application", subtype="pdf",
                         filename="report.pdf")
    files = []
    for label, message in (("12 KB multipart/alternative", alternative()),
                           ("80 KB multipart/mixed, PDF", mixed)):
        path = directory / (label.split()[0] + ".eml")
        path.write_bytes(message.as_bytes().replace(b"\r\n", b"\n"))
        files.append((label, path))
    return files


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of `pid` and its children so far."""
    ticks = 0
    for p in _family(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _family(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [pid]
    if children.exists():
        pids += [int(c) for c in children.read_text().split()]
    return pids


def _start_worker(sink_port: int, processes: int) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = {
        **os.environ,
        "SPAMVIEWER_IGNORE_DOTENV": "1",
        "DJANGO_SETTINGS_MODULE": "spamviewer.settings",
        "FILTER_LISTEN": f"127.0.0.1:{port}",
        "FILTER_NEXT_HOP": f"127.0.0.1:{sink_port}",
        "FILTER_HOSTNAME": "filter.bench",
        "FILTER_PROCESSES": str(processes),
        "FILTER_MAX_CLIENTS": "300",
        "FILTER_MAX_PER_IP": "0",
        "FILTER_MAX_BACKENDS": "300",
        "QUARANTINE_DIR": tempfile.mkdtemp(prefix="sv-bench-q-"),
    }
    process = subprocess.Popen([sys.executable, "manage.py", "runfilter"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    if "filter listening" not in line:
        raise SystemExit(f"runfilter did not start: {line}")
    return process, port


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
    process.stdout.close()


def _rss_kb(pid: int) -> int:
    """Resident memory of `pid` and its children, in KiB."""
    total = 0
    for p in _family(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _peak_rss(pid: int, work) -> int:
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_kb(pid))
            time.sleep(0.02)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        work()
    finally:
        done.set()
        thread.join()
    return peak


def _loads(args, sizes: tuple[int, ...], files: list[tuple[str, Path]]) -> list[dict]:
    """What each run sends: filler text of each size (the same volume of data for both,
    at least 500 messages), then each typical message."""
    loads = []
    for size in sizes:
        count = args.messages if size == 4 * 1024 else max(500, args.messages // 5)
        loads.append({"label": f"{size // 1024} KB", "messages": count, "size": size,
                      "goal": size == 4 * 1024, "sessions": (10, 20)})
    for label, path in files:
        count = max(500, args.messages // (2 if path.stat().st_size < 32768 else 5))
        loads.append({"label": label, "messages": count, "file": path, "goal": False,
                      "sessions": (20,)})
    return loads


def _measure(args, sink_port: int, worker: subprocess.Popen, port: int, label: str, *,
             loads: list[dict], goal: bool) -> list[dict]:
    """Each load and session count through `worker`, beside the ceiling measured just
    before it, best of --repeat."""
    results = []
    for spec in loads:
        content = {"file": spec["file"]} if "file" in spec else {"size": spec["size"]}
        count = spec["messages"]
        for sessions in spec["sessions"]:
            load = {"messages": count, "sessions": sessions, **content}
            ceiling = through = 0.0
            cpu = float("inf")
            for _ in range(max(1, args.repeat)):
                ceiling = max(ceiling, _source(sink_port, **load))
                before = _cpu_seconds(worker.pid)
                through = max(through, _source(port, **load))
                cpu = min(cpu, (_cpu_seconds(worker.pid) - before) / count)
            ratio = through / ceiling
            print(f"{spec['label']:>27} {sessions:>8} {label:>22} {ceiling:>10.0f} "
                  f"{through:>9.0f} {ratio:>6.2f} {cpu * 1e6:>12.0f} us")
            result = {
                "name": f"{spec['label']}, {sessions} sessions, {label}",
                "value": round(through, 1), "unit": "msg/s",
                "baseline_name": "smtp-sink ceiling", "baseline": round(ceiling, 1),
                "worker_cpu_us_per_message": round(cpu * 1e6),
            }
            if goal and spec["goal"]:
                result.update(goal=f">= {GOAL_RATIO:.2f} of the ceiling",
                              met=ratio >= GOAL_RATIO)
            results.append(result)
    return results


def _start_minimal(sink_port: int) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "minimal_relay.py"), str(port), str(sink_port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    if "listening" not in process.stdout.readline():
        raise SystemExit("bench/minimal_relay.py did not start")
    return process, port


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10000,
                        help="4 KB messages per run (100 KB runs send a fifth as many)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--amavis", default="", help="host:port of a running amavisd")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measure each pair this many times, keep the best of each")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON line with the results at the end")
    args = parser.parse_args()
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Debian package postfix)")

    results: list[dict] = []
    sink_port = _free_port()
    sink = subprocess.Popen(
        ["smtp-sink", *(["-u", "postfix"] if os.geteuid() == 0 else []),
         f"127.0.0.1:{sink_port}", "1024"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(sink_port)
        files = _typical_mail(Path(tempfile.mkdtemp(prefix="sv-bench-mail-")))
        print(f"{'message':>27} {'sessions':>8} {'worker':>22} {'ceiling/s':>10} "
              f"{'worker/s':>9} {'ratio':>6} {'worker CPU/msg':>15}")
        for processes in args.processes:
            worker, port = _start_worker(sink_port, processes)
            try:
                label = f"{processes} process{'es' if processes > 1 else ''}"
                # Typical mail through one and two processes; more add nothing here.
                loads = _loads(args, (4 * 1024, 100 * 1024), files if processes <= 2 else [])
                results += _measure(args, sink_port, worker, port, label, loads=loads,
                                    goal=True)
            finally:
                _stop(worker)
        # What any Python relay could reach here: bench/minimal_relay.py, no checks.
        minimal, port = _start_minimal(sink_port)
        try:
            results += _measure(args, sink_port, minimal, port, "minimal Python relay",
                                loads=_loads(args, (4 * 1024,), []), goal=False)
        finally:
            _stop(minimal)
        worker, port = _start_worker(sink_port, 1)
        try:
            peak = _peak_rss(worker.pid, lambda: _source(
                port, messages=max(args.messages, 2000), sessions=100, size=4 * 1024))
            print(f"worker RSS at 100 concurrent sessions (1 process): {peak / 1024:.0f} MB")
            results.append({"name": "worker RSS, 100 sessions, 1 process",
                            "value": round(peak / 1024), "unit": "MB",
                            "goal": f"< {GOAL_RSS_MB} MB", "met": peak / 1024 < GOAL_RSS_MB})
        finally:
            _stop(worker)
        if args.amavis:
            host, _, amavis_port = args.amavis.rpartition(":")
            rate = _source(int(amavis_port), messages=args.messages, sessions=10,
                           size=4 * 1024)
            print(f"amavisd-new at {args.amavis}, 4KB, 10 sessions: {rate:.0f}/s")
            ceiling = _source(sink_port, messages=args.messages, sessions=10, size=4 * 1024)
            results.append({"name": "amavisd-new, 4 KB, 10 sessions", "value": round(rate, 1),
                            "unit": "msg/s", "baseline_name": "smtp-sink ceiling",
                            "baseline": round(ceiling, 1)})
        else:
            installed = shutil.which("amavisd") or shutil.which("amavisd-new")
            print("amavisd-new: " + ("installed; give --amavis host:port of a running one"
                                     if installed else "not installed, not measured"))
    finally:
        sink.kill()
        sink.wait(10)
    if args.json:
        import json

        print(json.dumps({"bench": "filter_throughput", "cores": os.cpu_count(),
                          "title": f"Filter throughput, {args.messages} messages a run",
                          "results": results}))


if __name__ == "__main__":
    main()
