"""An asyncio client for clamd: INSTREAM over TCP or a unix socket, and PING.

The stream is sent as `zINSTREAM\\0`, then chunks of `<4-byte big-endian length><data>`,
then a zero-length chunk; clamd answers one NUL-terminated line:
`stream: OK`, `stream: <Name> FOUND` or `<reason> ERROR`.

A scan has three outcomes (`ClamdResult.status`): "clean", "found" (with the names) and
"error" (with the reason). Everything that is not a clear OK or a clear detection is an
error, never clean (fail closed): clamd unreachable or timing out, an ERROR reply (e.g.
`INSTREAM size limit exceeded`), `Heuristics.Limits.Exceeded.*` (clamd gave up on a file
too big or too deep to scan, with AlertExceedsMax), a blob larger than the client's own
`max_stream` (not sent at all), and any reply that does not parse. The policy turns an
error into a temporary failure (VIRUS_SCAN_FAIL, tempfail by default), so that the sending
side keeps the message and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass

from mailfilter.findings import Finding

CHUNK_SIZE = 64 * 1024
MAX_REPLY = 4096
_FOUND = re.compile(r"^(?:stream|fd\[\d+\]|[^:]*): (?P<name>[A-Za-z0-9._:/ -]{1,200}) FOUND$")
_OK = re.compile(r"^(?:stream|fd\[\d+\]|[^:]*): OK$")
# clamd's way of saying "I did not scan this completely" (AlertExceedsMax): not a virus name.
_LIMITS = "Heuristics.Limits.Exceeded"


@dataclass(frozen=True)
class ClamdResult:
    status: str  # "clean" | "found" | "error"
    names: tuple[str, ...] = ()
    reason: str = ""

    @property
    def clean(self) -> bool:
        return self.status == "clean"

    @property
    def found(self) -> bool:
        return self.status == "found"

    @property
    def error(self) -> bool:
        return self.status == "error"


def _error(reason: str) -> ClamdResult:
    return ClamdResult(status="error", reason=reason)


def parse_reply(reply: bytes) -> ClamdResult:
    """One clamd reply (without its terminator) to a result; unknown text is an error.

    A reply of several lines is never clean: a detection on any line is found (it must not
    be mistaken for a scan error, which the policy may pass), anything else is an error.
    """
    try:
        text = reply.decode("ascii").strip()
    except UnicodeDecodeError:
        return _error("clamd answered with non-ASCII text")
    lines = text.splitlines()
    if len(lines) > 1:
        results = [_parse_line(line.strip()) for line in lines if line.strip()]
        names = tuple(name for result in results if result.found for name in result.names)
        if names:
            return ClamdResult(status="found", names=names)
        return _error(f"clamd answered {len(lines)} lines: {text[:200]!r}")
    return _parse_line(text)


def _parse_line(text: str) -> ClamdResult:
    if _OK.match(text):
        return ClamdResult(status="clean")
    found = _FOUND.match(text)
    if found:
        name = found.group("name")
        if name.startswith(_LIMITS):
            return _error(f"clamd could not scan it completely ({name})")
        return ClamdResult(status="found", names=(name,))
    if text.endswith("ERROR"):
        return _error(f"clamd error: {text[:200]}")
    return _error(f"unexpected clamd reply: {text[:200]!r}")


class ClamdClient:
    """Talks to one clamd: `host`/`port` (TCP) or `path` (unix socket).

    `timeout` bounds each whole exchange (connect, send, reply), and `scan_blobs` as a
    whole (all the blobs of one message). `max_stream` should not be
    above clamd's StreamMaxLength; larger blobs are not sent and come back as errors.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 3310,
        path: str | None = None,
        timeout: float = 60.0,
        max_stream: int = 25 * 1024 * 1024,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.timeout = timeout
        self.max_stream = max_stream
        self.chunk_size = chunk_size

    def __repr__(self) -> str:
        where = self.path or f"{self.host}:{self.port}"
        return f"ClamdClient({where})"

    async def ping(self) -> bool:
        """True when clamd answers PONG within the timeout."""
        try:
            reply = await asyncio.wait_for(self._exchange(b"zPING\0", b""), self.timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return False
        return reply == b"PONG"

    async def scan(self, data: bytes, *, timeout: float | None = None) -> ClamdResult:
        """Scan one blob with INSTREAM, within `timeout` (default: the client's)."""
        if len(data) > self.max_stream:
            return _error(f"{len(data)} bytes is more than the {self.max_stream} sent to clamd")
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        try:
            reply = await asyncio.wait_for(self._exchange(b"zINSTREAM\0", data), limit)
        except TimeoutError:
            return _error(f"clamd timed out after {self.timeout:g}s")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return _error("clamd closed the connection without a complete reply")
        except OSError as error:
            return _error(f"clamd unreachable: {error.strerror or error}")
        return parse_reply(reply)

    async def scan_blobs(self, blobs: Iterable[tuple[str, bytes]]) -> ClamdResult:
        """Scan several blobs; found beats error beats clean, names carry their labels.

        `timeout` bounds the scan of all the blobs together, so that a hanging clamd costs
        one timeout per message, not one per part; blobs left when it has passed are not
        sent and make the result an error.
        """
        names: list[str] = []
        errors: list[str] = []
        deadline = time.monotonic() + self.timeout
        for label, data in blobs:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                errors.append(f"{label}: clamd timed out after {self.timeout:g}s")
                break
            result = await self.scan(data, timeout=remaining)
            if result.found:
                names.extend(f"{name} ({label})" for name in result.names)
            elif result.error:
                errors.append(f"{label}: {result.reason}")
        if names:
            return ClamdResult(status="found", names=tuple(names))
        if errors:
            return _error("; ".join(errors))
        return ClamdResult(status="clean")

    async def _exchange(self, command: bytes, data: bytes) -> bytes:
        if self.path:
            reader, writer = await asyncio.open_unix_connection(self.path, limit=MAX_REPLY)
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_REPLY)
        try:
            writer.write(command)
            if command == b"zINSTREAM\0":
                try:
                    for start in range(0, len(data), self.chunk_size):
                        chunk = data[start : start + self.chunk_size]
                        writer.write(struct.pack("!L", len(chunk)) + chunk)
                        await writer.drain()
                    writer.write(struct.pack("!L", 0))
                    await writer.drain()
                except (BrokenPipeError, ConnectionResetError):
                    # clamd stops reading and closes when the stream passes its
                    # StreamMaxLength; its reason is still waiting in the socket.
                    pass
            else:
                await writer.drain()
            reply = await reader.readuntil(b"\0")
            return reply[:-1]
        except BaseException:
            # Timed out, cancelled or failed: drop the connection at once. A graceful close
            # would wait for clamd to read what is still buffered, possibly forever.
            writer.transport.abort()
            raise
        finally:
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # clamd answered without reading everything
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def clamd_findings(result: ClamdResult, *, score: float = 1.0) -> list[Finding]:
    """VIRUS findings for a scan that found something; errors are the policy's to handle."""
    return [Finding("VIRUS", name, score, f"clamd: {name}") for name in result.names]
