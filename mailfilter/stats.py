"""Counters of the worker, and a Prometheus text endpoint to read them.

The counters live in one process and are only touched from its event loop, so plain
integers suffice. `serve_metrics` answers `GET /metrics` on FILTER_METRICS_LISTEN; the
`filterstats` management command reads that endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

# name -> help text. Counters with labels are rendered one line per label value.
COUNTERS: dict[str, str] = {
    "connections": "SMTP connections accepted",
    "connections_refused": "Connections refused with 421 (by reason: total, per_ip)",
    "tls_attempts": "STARTTLS commands received",
    "messages_received": "Messages whose DATA was read completely",
    "messages_passed": "Messages relayed to the next hop",
    "messages_quarantined": "Messages kept in the quarantine (by category)",
    "messages_rejected": "Messages refused after DATA (by reason)",
    "messages_tempfailed": "Messages answered with 4xx after DATA (by reason)",
    "bytes_received": "Octets of DATA read",
    "bytes_accepted": "Octets of messages relayed or quarantined",
    "bytes_rejected": "Octets of messages refused",
    "next_hop_attempts": "Transactions begun with the next hop",
    "next_hop_failures": "Next hop transactions that failed (by stage)",
    "protocol_errors": "Protocol errors (by kind)",
    "verdicts": "Content-check verdicts (by category: VIRUS, BANNED, SPAM, BADH, CLEAN, TEMPFAIL)",
    "badh_defects": "Messages with a bad-header or MIME defect (by defect name)",
    "banned_reasons": "Messages with a banned part (by reason kind)",
    "viruses_found": "Messages with a virus (by scanner: signatures, clamd)",
    "scanner_errors": "Scans that could not be completed (by scanner: clamd, spamd)",
    "reloads": "Profile and signature reloads (by result: ok, failed)",
    "dns_errors": "DNS check queries that decided nothing: timeout, SERVFAIL, missing zone "
    "(by profile variable)",
}


class Stats:
    def __init__(self) -> None:
        self._values: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def inc(self, name: str, amount: int = 1, *, label: str = "") -> None:
        if name not in COUNTERS:
            raise KeyError(name)
        self._values[name][label] += amount

    def get(self, name: str, label: str = "") -> int:
        return self._values.get(name, {}).get(label, 0)

    def total(self, name: str) -> int:
        return sum(self._values.get(name, {}).values())

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {name: dict(values) for name, values in self._values.items()}

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines = []
        for name, help_text in COUNTERS.items():
            metric = f"spamviewer_filter_{name}_total"
            lines.append(f"# HELP {metric} {help_text}")
            lines.append(f"# TYPE {metric} counter")
            values = self._values.get(name) or {"": 0}
            for label, value in sorted(values.items()):
                key = _label_key(name)
                suffix = f'{{{key}="{_escape(label)}"}}' if label else ""
                lines.append(f"{metric}{suffix} {value}")
        return "\n".join(lines) + "\n"


def _label_key(name: str) -> str:
    if name == "dns_errors":
        return "check"
    if name == "messages_quarantined":
        return "category"
    if name == "next_hop_failures":
        return "stage"
    if name in ("protocol_errors",):
        return "kind"
    if name == "verdicts":
        return "category"
    if name == "badh_defects":
        return "defect"
    if name in ("viruses_found", "scanner_errors"):
        return "scanner"
    if name == "reloads":
        return "result"
    return "reason"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse_metrics(text: str) -> dict[str, int]:
    """`{"metric{label}": value}` from the text format, for `filterstats`."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(float(value))
    return out


async def serve_metrics(stats: Stats, host: str, port: int) -> asyncio.Server:
    """A minimal HTTP/1.0 server: `GET /metrics` returns the counters, anything else 404."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            method, _, rest = request.partition(b" ")
            path = rest.split(b" ", 1)[0]
            if method == b"GET" and path in (b"/metrics", b"/metrics/"):
                body = stats.render().encode()
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            else:
                body = b"not found\n"
                head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, limit=8192)


async def fetch_metrics(host: str, port: int, *, timeout: float = 5.0) -> str:
    """The body of `GET /metrics` from a running worker."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: worker\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200") and not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"metrics endpoint answered {head.splitlines()[0]!r}")
    return body.decode()
