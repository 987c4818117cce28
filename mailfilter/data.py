"""Reading DATA: bounded memory, one end of data, and only CRLF-clean text kept.

aiosmtpd (>= 1.4.5) already ends DATA only at <CR><LF>.<CR><LF>, but it keeps bare CR and
bare LF in the content as they came, buffers an over-long line in full before refusing it,
and lets a refused message's bytes be discarded only once the size limit is crossed. The
accumulator here sees the stream one line (or one slice of an over-long line) at a time,
counts everything, and keeps nothing once the message is certain to be refused, so memory
stays below the size limit whatever the client sends.

Bare CR and LF (the "SMTP smuggling" raw material) are either refused or turned into CRLF
(`bare_lf="normalise"`, as Postfix's `smtpd_forbid_bare_newline = normalize` and aiosmtplib
do): the content the policy sees and the content relayed are the same CRLF-clean bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BARE = re.compile(rb"[\r\n]")

NOMINAL = "ok"
TOO_BIG = "size"
TOO_LONG = "line"
TOO_MANY_HEADERS = "headers"
BARE_LINE_END = "bare"


@dataclass
class DataLimits:
    max_size: int
    max_line_length: int
    max_header_count: int
    normalise_bare: bool


class DataAccumulator:
    """Feed it what the stream reader returns between 354 and the final dot."""

    def __init__(self, limits: DataLimits) -> None:
        self.limits = limits
        self.state = NOMINAL
        self.size = 0
        self.bare_seen = False
        self.eight_bit = False
        self.nul_seen = False
        self.header_count = 0
        self._out = bytearray()
        # The position in the logical (normalised) line: its length so far, and whether
        # its first octet was already seen.
        self._line_length = 0
        self._line_first: int | None = None
        self._in_headers = True
        # True when the next chunk starts a line of the SMTP stream (after a CRLF).
        self.at_line_start = True

    def feed(self, chunk: bytes) -> None:
        """A complete line ending in CRLF, or a slice of a longer line (never ending in CR
        that belongs to a CRLF)."""
        terminated = chunk.endswith(b"\r\n")
        if self.at_line_start and chunk.startswith(b"."):
            # Transparency (RFC 5321 4.5.2): only after a real CRLF.
            chunk = chunk[1:]
        self.at_line_start = terminated
        self.size += len(chunk)
        body = chunk[:-2] if terminated else chunk
        if not self.eight_bit and not body.isascii():
            self.eight_bit = True
        if not self.nul_seen and b"\0" in body:
            self.nul_seen = True
        if self.state != NOMINAL:
            return
        if self.size > self.limits.max_size:
            self._fail(TOO_BIG)
            return
        if _BARE.search(body):
            self.bare_seen = True
            if not self.limits.normalise_bare:
                self._fail(BARE_LINE_END)
                return
            segments = _BARE.split(body)
        else:
            segments = [body]
        last = len(segments) - 1
        for index, segment in enumerate(segments):
            self._extend_line(segment)
            if self.state != NOMINAL:
                return
            if index < last or terminated:
                self._end_line()
                if self.state != NOMINAL:
                    return
        self._out += b"\r\n".join(segments)
        if terminated:
            self._out += b"\r\n"

    def _extend_line(self, segment: bytes) -> None:
        if segment and self._line_first is None:
            self._line_first = segment[0]
        self._line_length += len(segment)
        if self._line_length > self.limits.max_line_length:
            self._fail(TOO_LONG)

    def _end_line(self) -> None:
        if self._in_headers:
            if self._line_length == 0:
                self._in_headers = False
            elif self._line_first not in (0x20, 0x09):
                self.header_count += 1
                if self.header_count > self.limits.max_header_count:
                    self._fail(TOO_MANY_HEADERS)
        self._line_length = 0
        self._line_first = None

    def _fail(self, state: str) -> None:
        self.state = state
        # Nothing of a refused message is kept.
        self._out = bytearray()

    def content(self) -> bytes:
        if self.state != NOMINAL:
            raise ValueError(f"message refused ({self.state})")
        return bytes(self._out)
