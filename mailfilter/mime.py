"""Parse a message once, with bounded work, into what the checks look at.

`parse_message(raw)` never raises for any input: whatever is wrong with the message
becomes a named `Defect`, and the checks decide what a defect means (a BADH finding, or
BANNED when it means part of the content could not be seen).

Bounded work comes first. Python's `email` parser recurses once per nesting level
(RecursionError near 1000 levels, and `as_bytes()`/`walk()` fail earlier), builds one
object per part, and runs a quadratic loop over the parameters of a long Content-Type
(`email.message._parseparam`). So before it sees anything, a cheap line scan
(`_Structure`) measures what the parser would be asked to build: nesting depth, parts,
header fields and header bytes per header section, parameter-header length. Beyond any cap
the parser is not run at all; the message keeps its top header fields and its raw body as
one opaque part, and a defect (`too-deep`, `too-many-parts`, ...) says why. Those defects
are in `UNSCANNABLE`. Most mail is a single part or a plain multipart under clean header
sections, and for that the parser is not run at all: the tree it would build is built from
the scan's header fields and, for a multipart, by a splitter that jumps from boundary line
to boundary line (`_plain_tree`); anything it cannot split exactly as the parser would
goes to the parser.

Everything else is ours, written to be linear: parameter splitting (so duplicate and
RFC 2231 continued parameters are seen as written, which Python's parser hides),
RFC 2047 decoding (encoded words of any length), lenient base64 and quoted-printable
decoding that records what was wrong, file-name variants, uuencoded and yEnc files in text
parts (at most `max_embedded_files` per part), and header-section checks on the raw bytes
(8-bit, NUL, bare CR, long lines, whitespace-only folded lines, syntax, missing and
duplicate fields).
"""

from __future__ import annotations

import binascii
import codecs
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import errors as email_errors
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32

from mailfilter import archives
from mailfilter.sniff import LISTABLE_ARCHIVES, OPAQUE_ARCHIVES, sniff


@dataclass(frozen=True)
class MimeLimits:
    max_depth: int = 64
    max_parts: int = 1000
    max_header_count: int = 1000
    max_header_bytes: int = 1_000_000
    max_addresses: int = 1000
    # Content-Type / Content-Disposition values longer than this, or with more
    # parameters, are not handed to Python's quadratic parameter splitter.
    max_parameter_header: int = 16_384
    max_parameters: int = 100
    # uuencoded and yEnc files decoded from one text part; beyond this the part is
    # reported as not fully scanned.
    max_embedded_files: int = 100
    budget_seconds: float = 5.0
    archive_limits: archives.ArchiveLimits = archives.DEFAULT_LIMITS


DEFAULT_LIMITS = MimeLimits()

# Defects after which some of the content was not looked at, or could be read two ways.
UNSCANNABLE = frozenset(
    {
        "too-deep",
        "too-many-parts",
        "too-many-headers",
        "header-section-too-large",
        "parameter-header-too-large",
        "parse-failure",
        "work-budget-exceeded",
        "duplicate-boundary",
        "too-many-embedded-files",
    }
)

SINGLETON_HEADERS = (
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
)
ADDRESS_HEADERS = frozenset(
    {"from", "sender", "reply-to", "to", "cc", "bcc", "resent-from", "resent-to", "resent-cc"}
)

_PYTHON_DEFECTS = {
    email_errors.NoBoundaryInMultipartDefect: "missing-boundary",
    email_errors.StartBoundaryNotFoundDefect: "start-boundary-not-found",
    email_errors.CloseBoundaryNotFoundDefect: "missing-close-boundary",
    email_errors.MultipartInvariantViolationDefect: "multipart-invariant-violation",
    email_errors.FirstHeaderLineIsContinuationDefect: "header-syntax",
    email_errors.MissingHeaderBodySeparatorDefect: "header-syntax",
    email_errors.MisplacedEnvelopeHeaderDefect: "header-syntax",
    email_errors.InvalidMultipartContentTransferEncodingDefect: "bad-multipart-encoding",
}

_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n|\Z)")
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+):")
# A header line (not the first) without any of the per-line defects: a field, or a
# continuation with something besides white space; 7-bit, no NUL, no bare CR.
_CLEAN_HEADER_LINE = re.compile(
    rb"(?:[\x21-\x39\x3b-\x7e]+:|[ \t]+[\x21-\x7e])[\x01-\x09\x0b\x0c\x0e-\x7f]*(?:\r\n|\n)?\Z"
)
# The encoded text has no length cap (clients decode words of any length); it cannot
# contain "?", so every attempt stops at the next "?" and finditer stays linear.
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,64})\?([QqBb])\?([^?\s]*)\?=")
_BAD_QP = re.compile(rb"=(?![0-9A-Fa-f]{2}|[ \t]*(?:\r\n|\r|\n|\Z))")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_B64 = bytes(byte for byte in range(256) if byte not in _B64_ALPHABET)
# What may be the first line of a uuencoded file (group 1: the name, after white space)
# or of a yEnc one (group 2: its parameters). Each alternative has one way to match a
# line, so a search is linear.
_EMBEDDED_BEGIN = re.compile(
    rb"^(?:begin[ \t]+[0-7]{3,4}[ \t]([^\r\n]*)|=ybegin ([^\r\n]*))\r?$", re.MULTILINE
)
_YENC_ESCAPE = re.compile(rb"=(.?)", re.DOTALL)
# An escape "=X" stands for X - 64 before the shift by 42 every byte undergoes; a "=" that
# ends a line escapes nothing.
_YENC_UNESCAPED = {bytes([0x3D, byte]): bytes([(byte - 64) % 256]) for byte in range(256)}
_YENC_UNESCAPED[b"="] = b""
_YENC_SHIFT = bytes((byte - 42) % 256 for byte in range(256))
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


_ARCHIVES = LISTABLE_ARCHIVES | OPAQUE_ARCHIVES
# Header fields some clients take a part's file name from when its parameters give none.
_NAME_FIELDS = ("content-name", "x-sun-data-name")


@dataclass(frozen=True)
class Defect:
    name: str
    detail: str = ""
    part: str = ""


@dataclass(frozen=True)
class Embedded:
    """A file carried inside a text part (uuencode, yEnc)."""

    name: str
    encoding: str
    data: bytes
    sniffed: str | None = None


@dataclass
class Part:
    """One node of the MIME tree. `path` is "" for the message itself, then "1", "2.1"..."""

    path: str
    depth: int
    content_type: str
    declared_type: str
    params: list[tuple[str, str]]
    disposition: str
    transfer_encoding: str
    filenames: list[str]
    payload: bytes
    sniffed: str | None
    is_container: bool
    headers: list[tuple[str, str]]
    embedded: list[Embedded] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"part {self.path}" if self.path else "message body"


@dataclass
class ParsedMessage:
    raw: bytes
    headers: list[tuple[str, bytes]]
    parts: list[Part]
    defects: list[Defect]
    texts: list[tuple[str, bytes]]
    limits: MimeLimits = DEFAULT_LIMITS
    deadline: float = 0.0
    # By the id() of the Part or Embedded listed: both live as long as the message.
    _listings: dict[int, archives.ArchiveListing] = field(default_factory=dict)

    def walk(self) -> Iterator[Part]:
        """Leaf parts, in document order, nested messages included."""
        return (part for part in self.parts if not part.is_container)

    def header(self, name: str) -> str | None:
        """The first field called `name`, unfolded and decoded (RFC 2047, 8-bit as UTF-8).

        CR, LF and NUL that an encoded word decodes to are replaced by spaces: decoded
        values are for matching and display, never to be written back as a header.
        """
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [
            decode_header_value(_text(value))
            for field_name, value in self.headers
            if field_name.lower() == wanted
        ]

    def raw_header_all(self, name: str) -> list[bytes]:
        wanted = name.lower()
        return [value for field_name, value in self.headers if field_name.lower() == wanted]

    @property
    def defect_names(self) -> set[str]:
        return {defect.name for defect in self.defects}

    @property
    def unscannable(self) -> list[Defect]:
        return [defect for defect in self.defects if defect.name in UNSCANNABLE]

    def listing(self, item: Part | Embedded) -> archives.ArchiveListing | None:
        """The archive listing of a part, or of a file embedded in a text part, whose
        content is an archive; computed once."""
        if item.sniffed not in _ARCHIVES:
            return None
        key = id(item)
        if key not in self._listings:
            if isinstance(item, Embedded):
                data, name = item.data, item.name or item.encoding
            else:
                data, name = item.payload, item.filenames[0] if item.filenames else item.label
            # One expansion and member limit for the whole message: the listings kept
            # for it are what the worker holds in memory for its archives.
            self._listings[key] = archives.list_archive(
                data,
                name=name,
                kind=item.sniffed,
                limits=self.limits.archive_limits,
                deadline=self.deadline + self.limits.archive_limits.budget_seconds,
                expanded=sum(listing.expanded for listing in self._listings.values()),
                counted=sum(listing.counted for listing in self._listings.values()),
            )
        return self._listings[key]

    def listings(self) -> Iterator[tuple[str, archives.ArchiveListing]]:
        """Every archive listing, with where the archive is: leaf parts and the files
        embedded in them, in document order."""
        for part in self.walk():
            listing = self.listing(part)
            if listing is not None:
                yield part.label, listing
            for embedded in part.embedded:
                listing = self.listing(embedded)
                if listing is not None:
                    yield embedded_label(part, embedded), listing

    def scan_blobs(self) -> Iterator[tuple[str, bytes]]:
        """Every byte string a content scanner should see, with a label.

        The raw message (so header fields, preambles and anything the parse could not
        place are scanned too), each part's decoded content, files embedded in text parts,
        and the preambles and epilogues of multiparts.
        """
        yield "message", self.raw
        for part in self.walk():
            yield part.label, part.payload
            for embedded in part.embedded:
                yield embedded_label(part, embedded), embedded.data
        yield from self.texts


def embedded_label(part: Part, embedded: Embedded) -> str:
    """How a file embedded in a text part is named in findings and scan labels."""
    return f"{part.label} {embedded.encoding} {embedded.name}"


def parse_message(raw: bytes, *, limits: MimeLimits = DEFAULT_LIMITS) -> ParsedMessage:
    """Parse `raw` (a whole message, any line endings); never raises."""
    deadline = time.monotonic() + limits.budget_seconds
    structure = _Structure(raw, limits)
    try:
        structure.scan()
    except _Exceeded:
        pass
    except Exception as exc:
        # Any failure of the scan is a finding about the message, not a crash.
        structure.defects.append(Defect("parse-failure", f"structure scan: {type(exc).__name__}"))
    headers = structure.top_headers
    defects = list(structure.defects)
    defects.extend(_header_section_defects(structure.top_lines, headers, limits))
    message = ParsedMessage(
        raw=raw,
        headers=headers,
        parts=[],
        defects=defects,
        texts=[],
        limits=limits,
        deadline=deadline,
    )
    if any(defect.name in UNSCANNABLE for defect in defects):
        message.parts.append(_opaque_part(raw[structure.top_end :], headers))
        return message
    try:
        tree = _plain_tree(raw, structure) or BytesParser(policy=compat32).parsebytes(raw)
        _Walker(message, deadline).walk(tree)
    except RecursionError:
        message.defects.append(Defect("too-deep", "the parser ran out of stack"))
        _replace_parts(message, raw[structure.top_end :])
    except _BudgetExceeded:
        message.defects.append(
            Defect("work-budget-exceeded", f"over {limits.budget_seconds:g} s of parsing")
        )
        _replace_parts(message, raw[structure.top_end :])
    except Exception as exc:
        # Whatever the parser trips on becomes a finding, never a crashed worker.
        message.defects.append(Defect("parse-failure", type(exc).__name__))
        _replace_parts(message, raw[structure.top_end :])
    return message


def _plain_tree(raw: bytes, structure: _Structure) -> Message | None:
    """The tree Python's parser would build, for a message whose structure is plain; None
    when the parser has to be asked.

    The parser's line-by-line pass is most of the cost of parsing mail. When every top
    header line is a field or the continuation of one (ending at an empty line or at the
    end: no structure defect, no stray line), the parser splits the section exactly as the
    structure scan did and records no defect. A type that is neither multipart/* nor
    message/* then makes it take everything after the header section as the payload; a
    multipart is split by `_Splitter`, which gives up wherever the parser would record a
    defect or take a path of its own. Header values are stored as compat32's
    `header_source_parse` makes them, so the walker sees the same Message either way.
    """
    if structure.defects or structure.top_strays:
        return None
    tree = Message(policy=compat32)
    for name, value in structure.top_headers:
        _set_field(tree, name, value)
    # The parser decides on the type this tree reports, whatever the scan made of it.
    main = tree.get_content_maintype()
    if main == "message":
        return None
    if main != "multipart":
        tree.set_payload(raw[structure.top_end :].decode("ascii", "surrogateescape"))
        return tree
    try:
        # Nothing encloses the message: its epilogue runs to the end, no boundary ends it.
        _Splitter(raw, structure.limits).multipart(tree, structure.top_end, [], 1)
    except _NotPlain:
        return None
    return tree


def _set_field(node: Message, name: str, value: bytes) -> None:
    """A field as the parser stores it; `value` is what follows the colon, folded lines
    included."""
    text = value.decode("ascii", "surrogateescape")
    node.set_raw(name, text.lstrip(" \t").rstrip("\r\n"))


class _NotPlain(Exception):
    """The multipart is not plain enough for `_Splitter`: the parser decides."""


# Lines starting with "--" that are not boundary lines the splitter passes over before
# it leaves the message to the parser.
_MAX_DASH_LINES = 1000
# What may follow a boundary (and its white space) on a boundary line.
_LINE_ENDS = (b"", b"\r\n", b"\n", b"\r")
# A boundary line: (start, end, index of its boundary in the stack, closing or not).
_Found = tuple[int, int, int, bool]


class _Splitter:
    """Splits plain multiparts as `email.feedparser` does, without its line-by-line pass.

    The parser reads a multipart line by line and matches every line against the boundary
    of each open multipart; a line of an outer one ends the inner multipart. Here
    `bytes.find` jumps from one line starting with "--" to the next, and only those lines
    are matched. The preamble, the payloads and the epilogue are the slices between, less
    the line end before a boundary line, which the parser also takes off. Wherever the
    parser would record a defect or take a path of its own, `_NotPlain` is raised: no
    boundary or a non-ASCII one, a missing start or close boundary, an outer boundary
    inside an inner multipart, a boundary line in a header section (or right after
    another), a header line that is not a field, message/* parts, multipart/digest, an
    encoded multipart, more parts or depth than the limits allow.
    """

    def __init__(self, raw: bytes, limits: MimeLimits) -> None:
        self.raw = raw
        self.limits = limits
        self.parts = 1
        # Lines starting with "--" that are no boundary line, so far.
        self.dash_lines = 0

    def multipart(self, node: Message, body: int, outer: list[bytes], depth: int) -> _Found | None:
        """Split `node`, whose body starts at `body`, below the multiparts whose boundary
        lines are `outer`; return the line of theirs that ends its epilogue (None: the
        end of the message)."""
        boundary = node.get_boundary()
        encoding = str(node.get("content-transfer-encoding", "8bit")).lower()
        if (
            not boundary
            or not boundary.isascii()
            or depth > self.limits.max_depth
            or node.get_content_type() == "multipart/digest"
            or encoding not in ("7bit", "8bit", "binary")
        ):
            raise _NotPlain
        stack = [*outer, b"--" + boundary.encode("ascii")]
        own = len(stack) - 1
        found = self.next_boundary(body, stack)
        if found is None or found[2] != own or found[3]:
            raise _NotPlain
        if found[0] > body:
            node.preamble = self.text(body, _before_line_end(self.raw, found[0], body))
        while not found[3]:
            self.parts += 1
            if self.parts > self.limits.max_parts:
                raise _NotPlain
            part = Message(policy=compat32)
            node.attach(part)
            start = self.header_section(part, found[1], stack)
            main = part.get_content_maintype()
            if main == "message":
                raise _NotPlain
            if main == "multipart":
                found = self.multipart(part, start, stack, depth + 1)
                # The line end before the next boundary line is the boundary's.
                part.epilogue = _without_line_end(part.epilogue) if part.epilogue else None
            else:
                found = self.next_boundary(start, stack)
                end = found[0] if found is not None else len(self.raw)
                part.set_payload(self.text(start, _before_line_end(self.raw, end, start)))
            if found is None or found[2] != own:
                # The end of the message, or an outer boundary, before the close boundary.
                raise _NotPlain
        close_end = found[1]
        after = self.next_boundary(close_end, outer) if outer else None
        node.epilogue = self.text(close_end, after[0] if after is not None else len(self.raw))
        return after

    def header_section(self, part: Message, pos: int, stack: list[bytes]) -> int:
        """Read a part's header fields into `part`; return where its content starts."""
        raw = self.raw
        name = ""
        value = b""
        count = 0
        while True:
            line_match = _LINE.match(raw, pos)
            assert line_match is not None
            line = line_match.group()
            if not line or (line.startswith(b"--") and _boundary_of(line, stack) is not None):
                # The end of the message or of the part inside its header section.
                raise _NotPlain
            pos = line_match.end()
            first = line[:1]
            if first in (b"\r", b"\n"):
                break
            if first in (b" ", b"\t"):
                if not name:
                    raise _NotPlain
                value += line
                continue
            field_match = _FIELD.match(line)
            if field_match is None:
                raise _NotPlain
            if name:
                _set_field(part, name, value)
            count += 1
            if count > self.limits.max_header_count:
                raise _NotPlain
            name = field_match.group(1).decode("ascii")
            value = line[field_match.end() :]
        if name:
            _set_field(part, name, value)
        return pos

    def next_boundary(self, pos: int, stack: list[bytes]) -> _Found | None:
        """The first boundary line of `stack` at or after `pos` (a line start)."""
        raw = self.raw
        separators = tuple(stack)
        start = _next_dash_line(raw, pos)
        while start >= 0:
            # Most lines starting with "--" in a body are not boundary lines at all.
            if raw.startswith(separators, start):
                line_match = _LINE.match(raw, start)
                assert line_match is not None
                found = _boundary_of(line_match.group(), stack)
                if found is not None:
                    return start, line_match.end(), found[0], found[1]
            # A body of such lines costs more here than in the parser's own pass.
            self.dash_lines += 1
            if self.dash_lines > _MAX_DASH_LINES:
                raise _NotPlain
            start = _next_dash_line(raw, start + 2)
        return None

    def text(self, start: int, end: int) -> str:
        return self.raw[start:end].decode("ascii", "surrogateescape")


def _boundary_of(line: bytes, stack: list[bytes]) -> tuple[int, bool] | None:
    """Whether `line` is a boundary line of one of `stack` (each "--" and a boundary),
    read as the parser's boundary regex reads it, the outermost first (the parser ends an
    inner multipart at an outer boundary): (index, closing) or None."""
    for index, separator in enumerate(stack):
        if line.startswith(separator):
            rest = line[len(separator) :]
            if rest[:2] == b"--" and rest[2:].lstrip(b" \t") in _LINE_ENDS:
                return index, True
            if rest.lstrip(b" \t") in _LINE_ENDS:
                return index, False
    return None


def _before_line_end(raw: bytes, end: int, start: int) -> int:
    """`end` less the line end just before it, within raw[start:end]."""
    if end - start >= 2 and raw[end - 2 : end] == b"\r\n":
        return end - 2
    if end > start and raw[end - 1] in b"\r\n":
        return end - 1
    return end


def _without_line_end(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith(("\r", "\n")) else text


def _replace_parts(message: ParsedMessage, body: bytes) -> None:
    message.parts[:] = [_opaque_part(body, message.headers)]


def _opaque_part(body: bytes, headers: list[tuple[str, bytes]]) -> Part:
    return Part(
        path="",
        depth=0,
        content_type="application/octet-stream",
        declared_type="",
        params=[],
        disposition="",
        transfer_encoding="",
        filenames=[],
        payload=body,
        sniffed=sniff(body),
        is_container=False,
        headers=[(name, _text(value)) for name, value in headers],
    )


# -- the structure scan ---------------------------------------------------------------


class _Exceeded(Exception):
    pass


class _BudgetExceeded(Exception):
    pass


class _Structure:
    """Counts, with the parser's own line rules, what the parser would build.

    Lines end at CRLF, CR or LF (as in `email.feedparser`). A header section ends at an
    empty line or at the first line that is neither a field nor a continuation. In a body
    only lines starting with "--" matter: they are matched against the boundaries of every
    open multipart, innermost first, and an outer boundary closes the inner ones, as the
    parser does.
    """

    def __init__(self, raw: bytes, limits: MimeLimits) -> None:
        self.raw = raw
        self.limits = limits
        self.defects: list[Defect] = []
        self.top_headers: list[tuple[str, bytes]] = []
        self.top_lines: list[bytes] = []
        self.top_end = 0
        # Lines of the top header section that are neither a field nor a continuation of
        # one ("From " lines, a continuation first, a bare colon).
        self.top_strays = 0
        self.parts = 1
        # open multiparts: (boundary, depth of the multipart)
        self.stack: list[tuple[bytes, int]] = []

    def fail(self, name: str, detail: str) -> _Exceeded:
        self.defects.append(Defect(name, detail))
        return _Exceeded(name)

    def count_part(self) -> None:
        self.parts += 1
        if self.parts > self.limits.max_parts:
            raise self.fail("too-many-parts", f"more than {self.limits.max_parts} MIME parts")

    def scan(self) -> None:
        pos, lines, fields = self.header_section(0, top=True)
        self.top_end = pos
        self.top_lines = lines
        self.top_headers = fields
        pos = self.body(pos, fields, depth=0)
        while True:
            found = self.next_delimiter(pos)
            if found is None:
                return
            start, end, boundary_index, closing = found
            depth = self.stack[boundary_index][1]
            del self.stack[boundary_index + (1 if not closing else 0) :]
            pos = end
            if not closing:
                self.count_part()
                pos, _, fields = self.header_section(pos, top=False)
                pos = self.body(pos, fields, depth=depth)

    def next_delimiter(self, pos: int) -> tuple[int, int, int, bool] | None:
        if not self.stack:
            return None
        boundaries = {boundary: index for index, (boundary, _) in enumerate(self.stack)}
        raw = self.raw
        prefixes = tuple(boundaries)
        start = _next_dash_line(raw, pos)
        while start >= 0:
            # Most lines starting with "--" in a body are not boundary lines at all.
            if raw.startswith(prefixes, start + 2):
                line = _LINE.match(raw, start)
                assert line is not None
                text = line.group().rstrip(b"\r\n").rstrip(b" \t")[2:]
                closing = text.endswith(b"--") and text[:-2] in boundaries
                key = text[:-2] if closing else text
                if key in boundaries:
                    return start, line.end(), boundaries[key], closing
            start = _next_dash_line(raw, start + 2)
        return None

    def header_section(self, pos: int, *, top: bool) -> tuple[int, list[bytes], list]:
        lines: list[bytes] = []
        fields: list[tuple[str, bytes]] = []
        size = 0
        raw = self.raw
        while pos < len(raw):
            match = _LINE.match(raw, pos)
            assert match is not None
            line = match.group()
            if not _HEADER_LINE.match(line):
                if line.strip(b"\r\n") == b"":
                    pos = match.end()
                elif top:
                    self.defects.append(
                        Defect("header-syntax", f"header line {len(lines) + 1} is not a field")
                    )
                break
            pos = match.end()
            size += len(line)
            if size > self.limits.max_header_bytes:
                raise self.fail(
                    "header-section-too-large",
                    f"header section over {self.limits.max_header_bytes} bytes",
                )
            if line[:1] in (b" ", b"\t") and fields:
                name, value = fields[-1]
                fields[-1] = (name, value + line)
            else:
                if len(fields) >= self.limits.max_header_count:
                    raise self.fail(
                        "too-many-headers",
                        f"more than {self.limits.max_header_count} header fields",
                    )
                field_match = _FIELD.match(line)
                if field_match:
                    fields.append((field_match.group(1).decode("ascii"), line[field_match.end() :]))
                elif top:
                    self.top_strays += 1
            if top:
                lines.append(line)
        for name, value in fields:
            if name.lower() in ("content-type", "content-disposition"):
                if len(value) > self.limits.max_parameter_header or (
                    value.count(b";") > self.limits.max_parameters
                ):
                    raise self.fail(
                        "parameter-header-too-large", f"{name} too long or too many parameters"
                    )
        return pos, lines, fields

    def body(self, pos: int, fields: list[tuple[str, bytes]], *, depth: int) -> int:
        """Open what the part's header announces; return where its content starts."""
        while True:
            content_type = _field(fields, "content-type")
            main, params = split_parameters(_text(content_type or b""))
            main = main.lower()
            if main.startswith("message/") and main != "message/delivery-status":
                depth += 1
                self.check_depth(depth)
                self.count_part()
                pos, _, fields = self.header_section(pos, top=False)
                continue
            if main == "message/delivery-status":
                # Each block of fields becomes a part of its own.
                following = self.next_delimiter(pos)
                end = following[0] if following else len(self.raw)
                blocks = self.raw.count(b"\n\n", pos, end) + self.raw.count(b"\r\n\r\n", pos, end)
                for _ in range(blocks + 1):
                    self.count_part()
            if main.startswith("multipart/"):
                boundary = _python_boundary(params)
                if boundary:
                    depth += 1
                    self.check_depth(depth)
                    self.stack.append((boundary.encode("utf-8", "surrogateescape"), depth))
            return pos

    def check_depth(self, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise self.fail("too-deep", f"MIME nesting deeper than {self.limits.max_depth}")


def _next_dash_line(raw: bytes, pos: int) -> int:
    """Where the first line at or after `pos` that starts with "--" starts, or -1.

    `bytes.find` of one byte (memchr) runs many times faster than of two, and most of a
    message (base64 above all) has no "-" at all: a "-" is found that way first, then
    "--" is looked for in the next few kilobytes only, so that one hyphen in a text does
    not make the two-byte search run through the attachment after it.
    """
    while True:
        dash = raw.find(b"-", pos)
        if dash < 0:
            return -1
        window = dash + _DASH_WINDOW
        double = raw.find(b"--", dash, window)
        if double < 0:
            # A "--" may start at the window's last byte.
            pos = window - 1
        elif double == 0 or raw[double - 1] in b"\r\n":
            return double
        else:
            pos = double + 1


_DASH_WINDOW = 4096


def _field(fields: list[tuple[str, bytes]], name: str) -> bytes | None:
    for field_name, value in fields:
        if field_name.lower() == name:
            return value
    return None


def _python_boundary(params: list[tuple[str, str]]) -> str | None:
    """The boundary Python's parser will use: the first one, continuations assembled."""
    for name, value in params:
        if name == "boundary":
            return value.rstrip()
        if name.startswith("boundary*"):
            assembled = assemble_rfc2231(params, "boundary")
            return assembled[0].rstrip() if assembled else None
    return None


# -- header sections ------------------------------------------------------------------


def _header_section_defects(
    lines: list[bytes], fields: list[tuple[str, bytes]], limits: MimeLimits
) -> list[Defect]:
    found: list[Defect] = []

    def add(name: str, detail: str) -> None:
        found.append(Defect(name, detail))

    for number, line in enumerate(lines, 1):
        # Most lines pass every test below; one regex says so at a fraction of the cost.
        if number > 1 and len(line) <= 998 and _CLEAN_HEADER_LINE.match(line):
            continue
        content = line.rstrip(b"\r\n")
        if line.endswith(b"\r") and not line.endswith(b"\r\n"):
            add("bare-cr-in-header", f"header line {number} ends with a bare CR")
        if b"\x00" in content:
            add("nul-in-header", f"NUL in header line {number}")
        if len(content) > 998:
            add("header-line-too-long", f"header line {number} is {len(content)} bytes")
        if not content.isascii():
            add("8bit-in-header", f"8-bit bytes in header line {number}")
        if line[:1] in (b" ", b"\t"):
            if content.strip() == b"":
                add("whitespace-only-folded-line", f"header line {number} is only whitespace")
            if number == 1:
                add("header-syntax", "the first header line is a continuation")
        elif not _FIELD.match(line) and not (number == 1 and line.startswith(b"From ")):
            add("header-syntax", f"header line {number} has no field name")
    names = [name.lower() for name, _ in fields]
    for required in ("from", "date"):
        if required not in names:
            add("missing-header", f"no {required.title()} field")
    if len(set(names)) < len(names):
        for singleton in SINGLETON_HEADERS:
            if names.count(singleton) > 1:
                add("duplicate-header", f"{names.count(singleton)} {singleton.title()} fields")
    for (name, value), lowered in zip(fields, names, strict=True):
        if lowered in ADDRESS_HEADERS and value.count(b"@") > limits.max_addresses:
            add("too-many-addresses", f"{name} has more than {limits.max_addresses} addresses")
        if b"=?" in value and _decodes_to_line_break(_text(value)):
            add("encoded-line-break-in-header", f"an encoded word in {name} decodes to CR/LF")
    return found


def _decodes_to_line_break(value: str) -> bool:
    return any(ch in _decode_words(_unfold(value)) for ch in "\r\n\x00")


# -- decoding helpers -----------------------------------------------------------------


def _text(value: bytes | str) -> str:
    """Header bytes as text: UTF-8 when valid, Latin-1 otherwise (never fails)."""
    if isinstance(value, str):
        value = value.encode("ascii", "surrogateescape")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _unfold(value: str) -> str:
    return value.replace("\r", "").replace("\n", "").strip()


def decode_charset(data: bytes, charset: str) -> str:
    try:
        codecs.lookup(charset)
        return data.decode(charset, "replace")
    except (LookupError, ValueError, TypeError):
        return data.decode("utf-8", "replace")


def _decode_words(value: str) -> str:
    if "=?" not in value:
        # No encoded word can start: most values, and `in` costs far less than finditer.
        return value
    out: list[str] = []
    position = 0
    previous_was_word = False
    for match in _ENCODED_WORD.finditer(value):
        between = value[position : match.start()]
        if not (previous_was_word and between.strip() == ""):
            out.append(between)
        charset = match.group(1).split("*", 1)[0]
        text = match.group(3).encode("ascii", "replace")
        if match.group(2) in "Bb":
            data, _ = decode_base64(text)
        else:
            data = binascii.a2b_qp(text, header=True)
        out.append(decode_charset(data, charset))
        position = match.end()
        previous_was_word = True
    out.append(value[position:])
    return "".join(out)


def decode_header_value(value: str) -> str:
    """Unfold, decode encoded words, and blank out CR, LF and NUL."""
    decoded = _decode_words(_unfold(value))
    return decoded.replace("\r", " ").replace("\n", " ").replace("\x00", " ")


def decode_base64(data: bytes) -> tuple[bytes, list[str]]:
    """Decode leniently: drop what is not base64, as mail clients do, and say so."""
    problems: list[str] = []
    cleaned = data.translate(None, _NOT_B64)
    if len(cleaned) != len(data.translate(None, b" \t\r\n")):
        problems.append("invalid-base64-characters")
    core = cleaned.rstrip(b"=")
    if b"=" in core:
        problems.append("base64-padding-inside-data")
        core = core.replace(b"=", b"")
    if len(core) % 4 == 1:
        problems.append("invalid-base64-length")
        core = core[:-1]
    padding = -len(core) % 4
    if len(cleaned) - len(cleaned.rstrip(b"=")) != padding and padding:
        problems.append("invalid-base64-padding")
    return binascii.a2b_base64(core + b"=" * padding), problems


def decode_quoted_printable(data: bytes) -> tuple[bytes, list[str]]:
    problems = ["bad-quoted-printable"] if _BAD_QP.search(data) else []
    return binascii.a2b_qp(data), problems


def _uudecode(lines: list[bytes]) -> bytes:
    out = bytearray()
    for line in lines:
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            # Some encoders write a few garbage bytes; decode the length the line declares.
            length = ((line[0] - 32) & 0x3F) if line else 0
            try:
                out += binascii.a2b_uu(line[: 1 + (length * 4 + 2) // 3])
            except binascii.Error:
                continue
    return bytes(out)


def _embedded_files(data: bytes, limit: int, deadline: float) -> tuple[list[Embedded], bool]:
    """The uuencoded and yEnc files in a text part, in order, at most `limit` of them; and
    whether there were more.

    A file starts at its begin line and ends at its end line, or at the next begin line of
    either kind (a begin line is never data of either encoding), or at the end of the text.
    Each stretch of the text is looked at once, so the work is linear in its length.
    """
    # Both markers contain "begin" and most text parts have neither: `in` rules them out
    # far faster than a MULTILINE regex that tries every line.
    if b"begin" not in data:
        return [], False
    found: list[Embedded] = []
    begins = _EMBEDDED_BEGIN.finditer(data)
    begin = _next_begin(begins)
    while begin is not None:
        if len(found) >= limit:
            return found, True
        if time.monotonic() > deadline:
            raise _BudgetExceeded
        match, encoding, name = begin
        following = _next_begin(begins)
        stop = following[0].start() if following is not None else len(data)
        if encoding == "uuencode":
            lines: list[bytes] = []
            # The stretch starts with the line end of the begin line.
            for line in data[match.end() : stop].splitlines()[1:]:
                if line.strip() in (b"end", b"`", b""):
                    break
                lines.append(line)
            decoded = _uudecode(lines)
        else:
            end = data.find(b"\n=yend", match.end(), stop)
            decoded = _yenc_decode(data[match.end() : end if end >= 0 else stop])
        found.append(Embedded(_clean(_text(name)), encoding, decoded, sniff(decoded)))
        begin = following
    return found, False


def _next_begin(begins: Iterator[re.Match[bytes]]) -> tuple[re.Match[bytes], str, bytes] | None:
    """The next begin line that names a file: (match, encoding, name).

    A uuencode line needs something after the mode, a yEnc line something after its first
    `name=`; the name is that, less surrounding spaces and tabs (a name of only white
    space is kept as one space).
    """
    for match in begins:
        uu_name = match.group(1)
        if uu_name is not None:
            encoding, written = "uuencode", uu_name
        else:
            parameters = match.group(2)
            at = parameters.find(b"name=")
            if at < 0:
                continue
            encoding, written = "yenc", parameters[at + 5 :]
        if written:
            return match, encoding, written.strip(b" \t") or b" "
    return None


def _yenc_decode(body: bytes) -> bytes:
    lines = []
    for line in body.splitlines():
        if line.startswith(b"=ypart"):
            continue
        if b"=" in line:
            line = _YENC_ESCAPE.sub(_yenc_unescape, line)
        lines.append(line)
    return b"".join(lines).translate(_YENC_SHIFT)


def _yenc_unescape(match: re.Match[bytes]) -> bytes:
    return _YENC_UNESCAPED[match.group()]


# -- parameters and file names --------------------------------------------------------


def split_parameters(value: str) -> tuple[str, list[tuple[str, str]]]:
    """`type/sub; a=1; b="x;y"` -> ("type/sub", [("a", "1"), ("b", "x;y")]).

    Every parameter as written, duplicates and RFC 2231 sections (`name*0*`) included;
    names lower-cased, quoted values unquoted. Linear in the length of `value`.
    """
    unfolded = _unfold(value)
    # Only a quoted string can hide a ";" (or a backslash mean anything): without one, the
    # value splits at every ";", and str.split does that without a loop per character.
    pieces = _split_quoted(unfolded) if '"' in unfolded else unfolded.split(";")
    params: list[tuple[str, str]] = []
    for piece in pieces[1:]:
        name, sep, raw_value = piece.partition("=")
        if not sep:
            continue
        params.append((name.strip().lower(), _unquote(raw_value.strip())))
    return pieces[0].strip(), params


# One parameter piece: anything but a quote or ";", or a quoted string (a backslash in it
# takes the next character as it is; an unclosed one runs to the end).
_PIECE = re.compile(r'(?:[^";]+|"(?:[^"\\]|\\[\s\S])*(?:"|\\?\Z))*')


def _split_quoted(value: str) -> list[str]:
    """`value` split at each ";" outside a quoted string."""
    pieces: list[str] = []
    pos = 0
    while True:
        piece = _PIECE.match(value, pos)
        assert piece is not None
        pieces.append(piece.group())
        pos = piece.end() + 1
        if pos > len(value):
            return pieces


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    if value.startswith('"'):
        return value[1:]
    return value


def assemble_rfc2231(params: list[tuple[str, str]], base: str) -> list[str]:
    """The values of `base*` and of `base*0`, `base*1*`... assembled and decoded."""
    values: list[str] = []
    sections: dict[int, tuple[str, bool]] = {}
    for name, value in params:
        if name == base + "*":
            values.append(_decode_rfc2231(value, first_encoded=True, rest=[]))
            continue
        if not name.startswith(base + "*"):
            continue
        index_text = name[len(base) + 1 :]
        encoded = index_text.endswith("*")
        index_text = index_text.rstrip("*")
        if index_text.isdigit() and len(index_text) < 5 and int(index_text) not in sections:
            sections[int(index_text)] = (value, encoded)
    if sections:
        ordered = [sections[index] for index in sorted(sections)]
        first, first_encoded = ordered[0]
        values.append(_decode_rfc2231(first, first_encoded=first_encoded, rest=ordered[1:]))
    return values


def _decode_rfc2231(first: str, *, first_encoded: bool, rest: list[tuple[str, bool]]) -> str:
    charset = "us-ascii"
    if first_encoded and first.count("'") >= 2:
        charset, _, first = first.split("'", 2)
    data = bytearray()
    for value, encoded in [(first, first_encoded), *rest]:
        raw = value.encode("utf-8", "surrogateescape")
        data += _percent_decode(raw) if encoded else raw
    return decode_charset(bytes(data), charset or "us-ascii")


def _percent_decode(raw: bytes) -> bytes:
    return re.sub(rb"%([0-9A-Fa-f]{2})", lambda match: bytes([int(match.group(1), 16)]), raw)


def _clean(name: str) -> str:
    return name.replace("\r", "").replace("\n", "")


def filename_variants(
    type_params: list[tuple[str, str]],
    disposition_params: list[tuple[str, str]],
    name_fields: tuple[str, ...] = (),
) -> list[str]:
    """Every name a client might give the part: plain, RFC 2231, RFC 2047, from both
    Content-Disposition (filename) and Content-Type (name), then the values of the
    `Content-Name` and `X-Sun-Data-Name` fields given as `name_fields` (Thunderbird names
    a part by them when both parameters are missing), as written, RFC 2047 decoded and
    unquoted. CR and LF are removed."""
    variants: list[str] = []
    for params, base in ((disposition_params, "filename"), (type_params, "name")):
        for name, value in params:
            if name == base:
                variants.append(value)
                if "=?" in value:
                    variants.append(_decode_words(value))
        variants.extend(assemble_rfc2231(params, base))
    for value in name_fields:
        written = _unfold(value)
        variants.append(written)
        decoded = _decode_words(written)
        variants.append(decoded)
        variants.append(_unquote(decoded))
    seen: dict[str, None] = {}
    for variant in variants:
        cleaned = _clean(variant)
        if cleaned:
            seen.setdefault(cleaned, None)
    return list(seen)


# -- walking the parsed tree ----------------------------------------------------------


class _Walker:
    def __init__(self, message: ParsedMessage, deadline: float) -> None:
        self.message = message
        self.deadline = deadline

    def defect(self, name: str, detail: str, path: str) -> None:
        self.message.defects.append(Defect(name, detail, path))

    def walk(self, root: Message) -> None:
        pending: list[tuple[Message, str, int]] = [(root, "", 0)]
        while pending:
            if time.monotonic() > self.deadline:
                raise _BudgetExceeded
            node, path, depth = pending.pop()
            children = self.visit(node, path, depth)
            prefix = f"{path}." if path else ""
            pending.extend(
                (child, f"{prefix}{number}", depth + 1)
                for number, child in reversed(list(enumerate(children, 1)))
            )

    def visit(self, node: Message, path: str, depth: int) -> list[Message]:
        label = f"part {path}" if path else "message"
        for defect in node.defects:
            name = (
                _PYTHON_DEFECTS.get(type(defect))
                or _CAMEL.sub("-", type(defect).__name__.removesuffix("Defect")).lower()
            )
            self.defect(name, f"{label}: {type(defect).__name__}", path)
        # raw_items(): items() would turn 8-bit values into Header objects.
        items = [(name, _text(value)) for name, value in node.raw_items()]
        names = [name.lower() for name, _ in items]
        first: dict[str, str] = {}
        for name, (_, value) in zip(names, items, strict=True):
            first.setdefault(name, value)
        declared, type_params = split_parameters(first.get("content-type", ""))
        disposition, disposition_params = split_parameters(first.get("content-disposition", ""))
        self.parameter_defects(type_params, disposition_params, declared.lower(), label, path)
        for name in ("content-type", "content-transfer-encoding", "content-disposition"):
            if names.count(name) > 1:
                self.defect("duplicate-mime-header", f"{label}: more than one {name}", path)
        name_fields: tuple[str, ...] = ()
        if "content-name" in first or "x-sun-data-name" in first:
            name_fields = tuple(
                value for name, (_, value) in zip(names, items, strict=True) if name in _NAME_FIELDS
            )
        content_type = node.get_content_type()
        encoding = _unfold(first.get("content-transfer-encoding", "")).lower()
        payload = node.get_payload()
        is_container = isinstance(payload, list)
        if is_container:
            if node.preamble:
                self.message.texts.append((f"{label} preamble", _bytes(node.preamble)))
            if node.epilogue:
                self.message.texts.append((f"{label} epilogue", _bytes(node.epilogue)))
            data = b""
        else:
            data = self.decode(
                _bytes(payload if isinstance(payload, str) else ""), encoding, label, path
            )
        part = Part(
            path=path,
            depth=depth,
            content_type=content_type,
            declared_type=declared.lower(),
            params=type_params,
            disposition=disposition.lower(),
            transfer_encoding=encoding,
            filenames=filename_variants(type_params, disposition_params, name_fields),
            payload=data,
            sniffed=sniff(data) if data else None,
            is_container=is_container,
            headers=items,
        )
        if not is_container and content_type.startswith("text/"):
            limit = self.message.limits.max_embedded_files
            part.embedded, more = _embedded_files(data, limit, self.deadline)
            if more:
                self.defect(
                    "too-many-embedded-files",
                    f"{label}: more than {limit} uuencoded or yEnc files",
                    path,
                )
        self.message.parts.append(part)
        return [child for child in payload if isinstance(child, Message)] if is_container else []

    def parameter_defects(
        self,
        type_params: list[tuple[str, str]],
        disposition_params: list[tuple[str, str]],
        main: str,
        label: str,
        path: str,
    ) -> None:
        names = [name for name, _ in type_params]
        if main.startswith("multipart/"):
            boundaries = [value for name, value in type_params if name == "boundary"]
            if len(boundaries) > 1:
                self.defect(
                    "duplicate-boundary", f"{label}: {len(boundaries)} boundary parameters", path
                )
            if any(value.strip() == "" for value in boundaries):
                self.defect("empty-boundary", f"{label}: boundary is empty", path)
            if any(name.startswith("boundary*") for name in names):
                self.defect(
                    "boundary-continuation",
                    f"{label}: boundary given as RFC 2231 sections",
                    path,
                )
        for params, header in (
            (type_params, "Content-Type"),
            (disposition_params, "Content-Disposition"),
        ):
            seen = [name for name, _ in params]
            for name in sorted(set(seen)):
                if seen.count(name) > 1 and name != "boundary":
                    self.defect("duplicate-parameter", f"{label}: {name} twice in {header}", path)

    def decode(self, raw: bytes, encoding: str, label: str, path: str) -> bytes:
        if encoding in ("", "7bit", "8bit", "binary"):
            return raw
        if encoding == "base64":
            data, problems = decode_base64(raw)
        elif encoding == "quoted-printable":
            data, problems = decode_quoted_printable(raw)
        elif encoding in ("x-uuencode", "uuencode", "x-uue", "uue"):
            lines = raw.splitlines()
            start = next((i for i, line in enumerate(lines) if line.startswith(b"begin ")), -1)
            data, problems = _uudecode(lines[start + 1 :]), []
        else:
            self.defect("unknown-transfer-encoding", f"{label}: {encoding[:40]!r}", path)
            return raw
        for problem in problems:
            self.defect(problem, f"{label}: {encoding}", path)
        return data


def _bytes(text: str) -> bytes:
    # compat32 keeps undecodable bytes as surrogates: this gives back the original bytes.
    return text.encode("utf-8", "surrogateescape")
