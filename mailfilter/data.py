"""Reading DATA: bounded memory, one end of data, and only CRLF-clean text kept.

A DATA reader must end the message only at <CR><LF>.<CR><LF>, never keep bare CR or
bare LF in what it relays, never buffer an over-long line in full, and drop a refused
message's bytes as soon as the refusal is certain. The accumulator here is fed the
stream as it arrives, in chunks of any size, counts everything, and keeps nothing once
the message is certain to be refused, so memory stays below the size limit whatever the
client sends.

The rules are those of a reader that takes one line (ended by CRLF, and only by CRLF) at
a time: the end of data is a line "." at the start of the data or after a CRLF;
transparency removes the first dot of a line that starts after a CRLF; the size, line
length and header count limits apply line by line, in the order the lines came. A chunk
of complete lines that is plainly within every limit (no bare CR or LF, no long line,
below the size limit) is checked and copied with a few scans over the whole chunk; any
other chunk goes line by line. An unfinished line is held back until its CRLF arrives,
or passed on in slices once it grows past `SLICE` octets.

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
# The worker cannot hold the message now (its DATA budget is spent): a 4xx, not a refusal.
NO_ROOM = "memory"

# The most octets of an unfinished line held back before a slice of it is passed on.
SLICE = 64 * 1024
_END = b"\r\n.\r\n"
# A line that starts with a dot (in text already known to hold no bare CR or LF).
_DOT_LINE = re.compile(rb"\n\.")


@dataclass
class DataLimits:
    max_size: int
    max_line_length: int
    max_header_count: int
    normalise_bare: bool


class DataAccumulator:
    """Feed it what the client sends after the 354, chunk by chunk, until `feed` finds the
    end of data."""

    def __init__(self, limits: DataLimits) -> None:
        self.limits = limits
        self.state = NOMINAL
        self.size = 0
        self.bare_seen = False
        self.eight_bit = False
        self.nul_seen = False
        # A line of the content starts with a dot (it came dot-stuffed).
        self.dot_lines = False
        self.header_count = 0
        self.done = False
        self._out = bytearray()
        # The octets after the last CRLF seen: the start of a line not finished yet.
        self._pending = bytearray()
        # The position in the logical (normalised) line: its length so far, and whether
        # its first octet was already seen.
        self._line_length = 0
        self._line_first: int | None = None
        self._in_headers = True
        # True when the next octet starts a line of the SMTP stream (after a CRLF).
        self.at_line_start = True

    # The stream ------------------------------------------------------------------------
    def feed(self, data: bytes) -> int:
        """Take the next octets of the stream. Returns -1 while the end of data is still to
        come, else how many octets of `data` belong to the message (the final ".\\r\\n"
        included); what follows them is the client's next command."""
        if self.done:
            raise ValueError("the end of data was already read")
        before = len(self._pending)
        if before:
            self._pending += data
            buf: bytes | bytearray = self._pending
        else:
            buf = data
        if self.at_line_start and buf.startswith(b".\r\n"):
            end = 0
        else:
            # A CRLF ends the terminator, and the held-back octets hold none: it ends in
            # `data`, and starts at most four octets before it.
            found = buf.find(_END, max(0, before - 4))
            end = found + 2 if found >= 0 else -1
        if end >= 0:
            self._lines(bytes(buf[:end]))
            self._pending = bytearray()
            self.done = True
            return end + 3 - before
        last = buf.rfind(b"\r\n", max(0, before - 1))
        if last >= 0:
            block = bytes(buf[: last + 2])
            self._pending = bytearray(buf[last + 2 :])
            self._lines(block)
        elif not before:
            self._pending += data
        pending = self._pending
        if len(pending) > SLICE:
            # A long line: pass it on in slices, keeping a final CR that a LF may follow.
            keep = 1 if pending.endswith(b"\r") else 0
            piece = bytes(pending[: len(pending) - keep])
            del pending[: len(pending) - keep]
            self._line(piece)
        return -1

    def _lines(self, block: bytes) -> None:
        """Complete lines, each ended by CRLF."""
        if not block:
            return
        if not self.at_line_start:
            # The rest of a line passed on in slices.
            first = block.index(b"\r\n") + 2
            self._line(block[:first])
            block = block[first:]
            if not block:
                return
        if self.state == NOMINAL and self._plain(block):
            return
        if self.state != NOMINAL:
            self._count(block)
            return
        start = 0
        while start < len(block):
            stop = block.index(b"\r\n", start) + 2
            self._line(block[start:stop])
            start = stop
            if self.state != NOMINAL:
                self._count(block[start:])
                return

    def _count(self, block: bytes) -> None:
        """Lines of a message already refused: counted, never kept."""
        stuffed = block.count(b"\r\n.") + (1 if block.startswith(b".") else 0)
        self.size += len(block) - stuffed
        if not self.eight_bit and not block.isascii():
            self.eight_bit = True
        if not self.nul_seen and b"\0" in block:
            self.nul_seen = True

    def _plain(self, block: bytes) -> bool:
        """Take lines starting at a line start when they are within every limit and hold
        no bare CR or LF, as the line-by-line rules would; False (nothing taken) else."""
        split = block.split(b"\r\n")
        split.pop()  # the empty remainder after the last CRLF
        # A CR or LF left in a line is a bare one (one copy and two memchr scans: cheaper
        # than counting CRs and LFs over the block).
        joined = b"".join(split)
        if b"\r" in joined or b"\n" in joined:
            return False
        if block.startswith(b".") or _DOT_LINE.search(block):
            self.dot_lines = True
            text = block[1:] if block.startswith(b".") else block
            text = text.replace(b"\r\n.", b"\r\n")
            split = text.split(b"\r\n")
            split.pop()
        else:
            text = block
        if self.size + len(text) > self.limits.max_size:
            return False
        if max(map(len, split)) > self.limits.max_line_length:
            return False
        header_count = self.header_count
        in_headers = self._in_headers
        if in_headers:
            for line in split:
                if not line:
                    in_headers = False
                    break
                if line[0] not in (0x20, 0x09):
                    header_count += 1
            if header_count > self.limits.max_header_count:
                return False
        self.header_count = header_count
        self._in_headers = in_headers
        self.size += len(text)
        if not self.eight_bit and not text.isascii():
            self.eight_bit = True
        if not self.nul_seen and b"\0" in text:
            self.nul_seen = True
        self._out += text
        return True

    # One line ---------------------------------------------------------------------------
    def _line(self, chunk: bytes) -> None:
        """A complete line ending in CRLF, or a slice of a longer line (never ending in CR
        that belongs to a CRLF)."""
        terminated = chunk.endswith(b"\r\n")
        if self.at_line_start and chunk.startswith(b"."):
            # Transparency (RFC 5321 4.5.2): only after a real CRLF.
            chunk = chunk[1:]
            self.dot_lines = True
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

    def give_up(self, state: str) -> None:
        """Keep nothing more of the message (read to its end, counted) and refuse it for
        `state`: the caller's reason, such as NO_ROOM."""
        if self.state == NOMINAL:
            self._fail(state)

    @property
    def held(self) -> int:
        """Octets of the message held in memory now (the unfinished line included)."""
        return len(self._out) + len(self._pending)

    @property
    def verbatim(self) -> bool:
        """The content can follow a DATA command as it is: every line ends in CRLF (it
        always does) and none starts with a dot (a line made by normalising a bare CR
        or LF might)."""
        return not self.dot_lines and not self.bare_seen

    def content(self) -> bytes:
        if self.state != NOMINAL:
            raise ValueError(f"message refused ({self.state})")
        return bytes(self._out)
