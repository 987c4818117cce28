"""An asyncio client for SpamAssassin's spamd (SPAMC/1.5, SYMBOLS), and X-Spam-* headers.

A check has three outcomes (`SpamResult.status`):
  "scanned"  spamd's score, its required score and the names of the tests that hit;
  "skipped"  the message is larger than the profile's spam_max_size and was not sent
             (the appliance: "messages larger than this size will be scanned for viruses,
             but not for spam");
  "error"    spamd unreachable, timing out, closing early, answering a non-zero code or
             text that does not parse.

Policy for "skipped" and "error" (hostile-input case 37): the message is not held back.
SpamAssassin adds nothing to the message's score, the profile's own rules still count, and
the message carries `X-Spam-Status: Unscanned, reason=<why>` (`unscanned_headers`) so that
people and mail clients can see that it was not looked at. Spam filtering is a matter of
degree, and a spamd outage must not stop mail; the virus scan, by contrast, fails closed.
`timeout` (30 s by default) keeps a hanging spamd well within Postfix's
smtpd_proxy_timeout (100 s) in before-queue mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from dataclasses import dataclass

from mailfilter.findings import Finding

MAX_REPLY = 64 * 1024
_STATUS = re.compile(rb"^SPAMD/(\d+\.\d+) (\d+) ?(.*)$")
_SPAM = re.compile(r"^(True|False|Yes|No) ; (-?\d+(?:\.\d+)?) / (-?\d+(?:\.\d+)?)$")
_TEST = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_ATOM = re.compile(r"[^,]+,?|,")
LEVEL_CAP = 50


@dataclass(frozen=True)
class SpamResult:
    status: str  # "scanned" | "skipped" | "error"
    score: float = 0.0
    required: float = 0.0
    tests: tuple[str, ...] = ()
    reason: str = ""

    @property
    def scanned(self) -> bool:
        return self.status == "scanned"


def _error(reason: str) -> SpamResult:
    return SpamResult(status="error", reason=reason)


def parse_response(response: bytes) -> SpamResult:
    """A complete spamd response to SYMBOLS into a result; anything odd is an error."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return _error("spamd response has no header end")
    lines = head.split(b"\r\n")
    status = _STATUS.match(lines[0])
    if not status:
        return _error(f"unexpected spamd status line {lines[0][:100]!r}")
    if status.group(2) != b"0":
        message = status.group(3).decode("ascii", "replace")[:100]
        return _error(f"spamd answered {status.group(2).decode()} {message}")
    spam = None
    length = None
    for line in lines[1:]:
        name, _, value = line.decode("ascii", "replace").partition(":")
        name = name.strip().lower()
        if name == "spam":
            spam = _SPAM.match(value.strip())
        elif name == "content-length":
            digits = value.strip()
            # ASCII digits only, and few enough for int(): a longer number is no length
            # a response capped at MAX_REPLY can have.
            if not (digits.isascii() and digits.isdigit()) or len(digits) > 20:
                return _error("spamd sent a bad Content-length")
            length = int(digits)
    if spam is None:
        return _error("spamd response has no valid Spam header")
    if length is not None and len(body) != length:
        return _error(f"spamd body is {len(body)} bytes, Content-length said {length}")
    score, required = float(spam.group(2)), float(spam.group(3))
    if not (math.isfinite(score) and math.isfinite(required)):
        return _error("spamd score is not a number")
    text = body.decode("ascii", "replace").strip()
    tests = tuple(test for test in (t.strip() for t in text.split(",")) if _TEST.fullmatch(test))
    return SpamResult(status="scanned", score=score, required=required, tests=tests)


class SpamdClient:
    """Talks to one spamd: `host`/`port` (TCP) or `path` (unix socket)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 783,
        path: str | None = None,
        timeout: float = 30.0,
        user: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.timeout = timeout
        self.user = user

    def __repr__(self) -> str:
        return f"SpamdClient({self.path or f'{self.host}:{self.port}'})"

    async def ping(self) -> bool:
        try:
            exchange = self._exchange(b"PING SPAMC/1.5\r\n\r\n")
            response = await asyncio.wait_for(exchange, self.timeout)
        except (OSError, TimeoutError, asyncio.LimitOverrunError, ValueError):
            return False
        return response.startswith(b"SPAMD/") and b" 0 PONG" in response

    async def check(self, message: bytes, *, max_size: int | None = None) -> SpamResult:
        """Score a message; larger than `max_size` (spam_max_size) means skipped."""
        if max_size is not None and len(message) > max_size:
            return SpamResult(
                status="skipped", reason=f"{len(message)} bytes is over spam_max_size {max_size}"
            )
        request = b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n" % len(message)
        if self.user:
            request += b"User: %s\r\n" % self.user.encode("ascii")
        request += b"\r\n" + message
        try:
            response = await asyncio.wait_for(self._exchange(request), self.timeout)
        except TimeoutError:
            return _error(f"spamd timed out after {self.timeout:g}s")
        except (asyncio.LimitOverrunError, ValueError):
            return _error("spamd response too long")
        except OSError as error:
            return _error(f"spamd unreachable: {error.strerror or error}")
        if not response:
            return _error("spamd closed the connection without answering")
        return parse_response(response)

    async def _exchange(self, request: bytes) -> bytes:
        if self.path:
            reader, writer = await asyncio.open_unix_connection(self.path)
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(request)
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            response = bytearray()
            while chunk := await reader.read(65536):
                response += chunk
                if len(response) > MAX_REPLY:
                    raise ValueError("response too long")
            return bytes(response)
        except BaseException:
            # Timed out, cancelled or failed: drop the connection at once. A graceful close
            # would wait for spamd to read what is still buffered, possibly forever.
            writer.transport.abort()
            raise
        finally:
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def spam_findings(result: SpamResult, *, weight: float) -> list[Finding]:
    """The SPAM finding for a scanned message: spamd's score times the profile's weight.

    A skipped or failed scan adds nothing (see the module's policy note), and neither does
    a weight of 0.
    """
    if not result.scanned or weight == 0:
        return []
    tests = ",".join(result.tests) or "none"
    detail = f"SpamAssassin {result.score:.1f} (tests={tests})"
    return [Finding("SPAM", "spamassassin", result.score * weight, detail)]


def spam_status(
    *, is_spam: bool, score: float, required: float, tests: tuple[str, ...] | list[str] = ()
) -> str:
    """An X-Spam-Status value in SpamAssassin's layout, folded at 78 columns with CRLF-TAB."""
    words = [
        ("Yes," if is_spam else "No,"),
        f"score={score:.1f}",
        f"required={required:.1f}",
        "tests=" + (",".join(t for t in tests if _TEST.fullmatch(t)) or "none"),
    ]
    status = " ".join(words)
    # Words of one or more characters, one space apart: a value that fits on the first line
    # is what folding would give back.
    if len("X-Spam-Status: ") + len(status) <= 78:
        return status
    return _fold("X-Spam-Status", status)


def spam_level(score: float, char: str = "*") -> str:
    """An X-Spam-Level value: one star per whole point, at most 50, none below 1."""
    if not math.isfinite(score) or score < 1:
        return ""
    return char * min(int(score), LEVEL_CAP)


def spam_score(score: float) -> str:
    """An X-Spam-Score value, as amavisd-new writes it (three decimals)."""
    return f"{score:.3f}"


def spam_headers(
    *, is_spam: bool, score: float, required: float, tests: tuple[str, ...] | list[str] = ()
) -> list[tuple[str, str]]:
    status = spam_status(is_spam=is_spam, score=score, required=required, tests=tests)
    return [
        ("X-Spam-Status", status),
        ("X-Spam-Level", spam_level(score)),
        ("X-Spam-Score", spam_score(score)),
    ]


def unscanned_headers(result: SpamResult) -> list[tuple[str, str]]:
    """The mark for a message spamd did not score (skipped or error)."""
    reason = "oversize" if result.status == "skipped" else "error"
    return [("X-Spam-Status", f"Unscanned, reason={reason}")]


def _fold(name: str, value: str) -> str:
    """Fold at spaces or after commas so that lines stay within 78 characters.

    Breaking after a comma puts CRLF-TAB inside the tests list, as SpamAssassin does.
    """
    atoms: list[tuple[str, str]] = []  # (separator before the atom, atom)
    for index, word in enumerate(value.split(" ")):
        for part_index, atom in enumerate(_ATOM.findall(word)):
            atoms.append((" " if index and not part_index else "", atom))
    lines: list[str] = []
    current = ""
    width = len(name) + 2
    for separator, atom in atoms:
        if current and width + len(current) + len(separator) + len(atom) > 78:
            lines.append(current)
            current, width = atom, 1
        else:
            current += separator + atom
    lines.append(current)
    return "\r\n\t".join(lines)
