"""Listing what an archive holds, without letting the archive decide how much work that is.

Supported: zip, gzip, bzip2, xz and tar, nested in any order (so .tgz and .tbz too).
Every layer is decompressed as a stream with hard caps checked while bytes come out:
nesting depth, member count, total uncompressed bytes, compression ratio per member and a
time budget. The member count and the total are the message's, not each archive's (as
amavisd-new's $MAXFILES and $MAX_EXPANSION_QUOTA): the caller passes on what the message's
archives listed before held and expanded to, so that many attachments cannot each take
them in full. Sizes written in archive headers are never used to size a read: a zip member
is inflated from its real compressed bytes and compared with what its header promised
afterwards, a tar member is read with a byte cap (sparse members can claim terabytes).

Python 3.11.7's `zipfile` does not refuse overlapping entries (the CVE-2024-0450 check
came in 3.11.8), so the ranges every entry occupies are compared here: an entry whose bytes
start inside another's is the "better zip bomb" construction and is reported as a bomb.

Names are taken as the unpackers people use would give them: a zip entry also under the
name its Info-ZIP Unicode Path extra field gives it, a gzip member also under the name
gunzip derives from the archive's own name when the header records another.

Whatever cannot be looked into is reported, never passed as empty: encrypted members,
corrupt or truncated archives, unsupported compression methods, and rar/7z (no lister is
bundled) are "undecipherable"; cap violations are "bomb". Either stops the listing of
that archive, and the banned-attachment check turns it into a BANNED finding.
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from mailfilter import sniff as sniffing

BOMB = "bomb"
UNDECIPHERABLE = "undecipherable"

_STEP = 64 * 1024
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


@dataclass(frozen=True)
class ArchiveLimits:
    max_depth: int = 5
    max_members: int = 1500
    max_total_bytes: int = 100 * 2**20
    max_ratio: int = 100
    # The ratio is only judged once a member has produced this much: a tiny file of
    # zeros compresses 1000:1 without being a threat.
    ratio_floor: int = 2**20
    # Members larger than this are listed and checked but their bytes are not kept
    # (`Member.unscanned`).
    max_kept_bytes: int = 25 * 2**20
    budget_seconds: float = 10.0


DEFAULT_LIMITS = ArchiveLimits()


@dataclass(frozen=True)
class Member:
    chain: tuple[str, ...]
    name: str
    size: int
    sniffed: str | None
    data: bytes | None
    encrypted: bool = False

    @property
    def path(self) -> str:
        return "/".join((*self.chain, self.name))

    @property
    def unscanned(self) -> bool:
        """Whether no later scan can see the member's content: its bytes were read but are
        not kept (over `max_kept_bytes`), and it is not an archive whose own members were
        listed (and kept) in its place."""
        return (
            self.data is None
            and self.size > 0
            and self.sniffed not in sniffing.LISTABLE_ARCHIVES
        )


@dataclass(frozen=True)
class Problem:
    kind: str
    reason: str


@dataclass
class ArchiveListing:
    members: list[Member] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # Uncompressed octets produced while listing (every layer), counted against
    # `max_total_bytes`, and members counted against `max_members`.
    expanded: int = 0
    counted: int = 0


class _Stop(Exception):
    """A cap was crossed: the problem is recorded, the whole listing ends."""


def list_archive(
    data: bytes,
    *,
    name: str = "archive",
    kind: str | None = None,
    limits: ArchiveLimits = DEFAULT_LIMITS,
    deadline: float | None = None,
    expanded: int = 0,
    counted: int = 0,
) -> ArchiveListing:
    """Every member of the archive `data` (named `name`), nested archives included.

    `kind` is a type from `mailfilter.sniff`; it is sniffed when not given. `deadline` is
    a `time.monotonic()` value, for a budget shared with the rest of the message.
    `expanded` and `counted`: what other archives of the message expanded to and held
    already; `max_total_bytes` and `max_members` bound them and this archive's together.
    """
    own_deadline = time.monotonic() + limits.budget_seconds
    lister = _Lister(limits, own_deadline if deadline is None else min(deadline, own_deadline))
    lister.total = expanded
    lister.count = counted
    try:
        lister.list(data, kind or sniffing.sniff(data), (name,), 1)
    except _Stop:
        pass
    lister.listing.expanded = lister.total - expanded
    lister.listing.counted = lister.count - counted
    return lister.listing


def _clean_name(name: str) -> str:
    return name.replace("\r", "").replace("\n", "")


class _Lister:
    def __init__(self, limits: ArchiveLimits, deadline: float) -> None:
        self.limits = limits
        self.deadline = deadline
        self.listing = ArchiveListing()
        self.count = 0
        self.total = 0

    # -- bookkeeping ------------------------------------------------------------------
    def stop(self, kind: str, reason: str) -> _Stop:
        self.listing.problems.append(Problem(kind, reason))
        return _Stop(reason)

    def problem(self, kind: str, reason: str) -> None:
        self.listing.problems.append(Problem(kind, reason))

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise self.stop(BOMB, "archive time budget exceeded")

    def add(
        self,
        chain: tuple[str, ...],
        name: str,
        data: bytes | None,
        depth: int,
        *,
        encrypted: bool = False,
    ) -> None:
        self.count += 1
        if self.count > self.limits.max_members:
            raise self.stop(BOMB, f"more than {self.limits.max_members} archive members")
        name = _clean_name(name)
        kind = sniffing.sniff(data) if data else None
        kept = data if data is not None and len(data) <= self.limits.max_kept_bytes else None
        self.listing.members.append(
            Member(chain, name, len(data or b""), kind, kept, encrypted=encrypted)
        )
        if data and kind in sniffing.LISTABLE_ARCHIVES | sniffing.OPAQUE_ARCHIVES:
            self.list(data, kind, (*chain, name), depth + 1)

    # -- dispatch ---------------------------------------------------------------------
    def list(self, data: bytes, kind: str | None, chain: tuple[str, ...], depth: int) -> None:
        self.tick()
        where = "/".join(chain)
        if depth > self.limits.max_depth:
            raise self.stop(BOMB, f"nesting deeper than {self.limits.max_depth} at {where}")
        if kind == sniffing.ZIP:
            self.list_zip(data, chain, depth)
        elif kind == sniffing.TAR:
            self.list_tar(data, chain, depth)
        elif kind == sniffing.GZIP:
            out = self.inflate_gzip(data, where)
            suffixes = (".gz", ".tgz", ".z")
            recorded = _gzip_name(data)
            self.add(chain, _inner_name(chain[-1], suffixes, recorded), out, depth)
            # gunzip without -N names the output after the archive, not after the header.
            derived = _stripped_name(chain[-1], suffixes)
            if recorded and derived and _clean_name(derived) != _clean_name(recorded):
                self.add(chain, derived, None, depth)
        elif kind == sniffing.BZIP2:
            out = self.inflate_buffered(bz2.BZ2Decompressor, data, where, b"BZh")
            self.add(chain, _inner_name(chain[-1], (".bz2", ".tbz", ".tbz2"), None), out, depth)
        elif kind == sniffing.XZ:
            out = self.inflate_buffered(lzma.LZMADecompressor, data, where, b"\xfd7zXZ\x00")
            self.add(chain, _inner_name(chain[-1], (".xz", ".txz"), None), out, depth)
        elif kind in sniffing.OPAQUE_ARCHIVES:
            self.problem(UNDECIPHERABLE, f"cannot look into {kind} archive {where}")
        else:
            self.problem(UNDECIPHERABLE, f"not a known archive: {where}")

    # -- streams ----------------------------------------------------------------------
    def check_growth(self, produced: int, consumed: int, where: str) -> None:
        if self.total + produced > self.limits.max_total_bytes:
            mb = self.limits.max_total_bytes // 2**20
            raise self.stop(BOMB, f"archive expands beyond {mb} MB at {where}")
        if produced > self.limits.ratio_floor and produced > self.limits.max_ratio * max(
            consumed, 1
        ):
            raise self.stop(
                BOMB, f"zip bomb: ratio {produced // max(consumed, 1)}:1 in member {where}"
            )
        self.tick()

    def inflate_zlib(self, data: bytes, wbits: int, where: str, *, members: bool) -> bytes:
        """Inflate `data`; with `members`, concatenated gzip members are read too."""
        out = bytearray()
        start = 0
        while True:
            decompressor = zlib.decompressobj(wbits)
            pos = start
            try:
                while not decompressor.eof and pos < len(data):
                    piece = data[pos : pos + _STEP]
                    pos += len(piece)
                    chunk = decompressor.decompress(piece, _STEP)
                    while True:
                        out += chunk
                        self.check_growth(len(out), pos - len(decompressor.unconsumed_tail), where)
                        if not decompressor.unconsumed_tail or decompressor.eof:
                            break
                        chunk = decompressor.decompress(decompressor.unconsumed_tail, _STEP)
            except zlib.error as exc:
                reason = f"corrupt compressed data in {where}: {exc}"
                raise self.stop(UNDECIPHERABLE, reason) from exc
            if not decompressor.eof:
                raise self.stop(UNDECIPHERABLE, f"truncated compressed data in {where}")
            rest = decompressor.unused_data
            if not members or not rest.startswith(b"\x1f\x8b"):
                self.total += len(out)
                return bytes(out)
            start = len(data) - len(rest)

    def inflate_gzip(self, data: bytes, where: str) -> bytes:
        return self.inflate_zlib(data, 31, where, members=True)

    def inflate_buffered(
        self,
        factory: Callable[[], bz2.BZ2Decompressor | lzma.LZMADecompressor],
        data: bytes,
        where: str,
        magic: bytes,
    ) -> bytes:
        out = bytearray()
        start = 0
        while True:
            decompressor = factory()
            pos = start
            try:
                while not decompressor.eof:
                    if decompressor.needs_input:
                        if pos >= len(data):
                            raise self.stop(UNDECIPHERABLE, f"truncated compressed data in {where}")
                        piece = data[pos : pos + _STEP]
                        pos += len(piece)
                    else:
                        piece = b""
                    out += decompressor.decompress(piece, _STEP)
                    self.check_growth(len(out), pos, where)
            except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
                reason = f"corrupt compressed data in {where}: {exc}"
                raise self.stop(UNDECIPHERABLE, reason) from exc
            rest = decompressor.unused_data
            if not rest.startswith(magic):
                self.total += len(out)
                return bytes(out)
            start = len(data) - len(rest)

    # -- zip --------------------------------------------------------------------------
    def list_zip(self, data: bytes, chain: tuple[str, ...], depth: int) -> None:
        where = "/".join(chain)
        announced = _zip_announced_entries(data)
        if announced is not None and self.count + announced > self.limits.max_members:
            raise self.stop(
                BOMB,
                f"more than {self.limits.max_members} archive members ({where} "
                f"announces {announced})",
            )
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            infos = archive.infolist()
        except (
            zipfile.BadZipFile,
            zipfile.LargeZipFile,
            OSError,
            ValueError,
            EOFError,
            struct.error,
            UnicodeDecodeError,
            NotImplementedError,
        ) as exc:
            raise self.stop(UNDECIPHERABLE, f"corrupt zip {where}: {exc}") from exc
        if self.count + len(infos) > self.limits.max_members:
            raise self.stop(BOMB, f"more than {self.limits.max_members} archive members")
        spans = []
        for info in infos:
            span = self.zip_span(data, info, where)
            spans.append((span[0], span[2], info))
        spans.sort(key=lambda item: item[0])
        for (_, end, info), (start, _, following) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise self.stop(
                    BOMB,
                    f"zip bomb: overlapping entries {info.filename!r} and "
                    f"{following.filename!r} in {where}",
                )
        for info in infos:
            self.tick()
            if info.orig_filename != info.filename:
                # "evil.exe\0.txt": zipfile cuts at the NUL, other unpackers may not.
                self.add(chain, info.orig_filename.replace("\0", "\\0"), None, depth)
            for unicode_name in self.zip_unicode_names(data, info):
                if unicode_name != info.filename:
                    self.add(chain, unicode_name.replace("\0", "\\0"), None, depth)
            if info.flag_bits & 0x1:
                # The name is readable, the content is not: keep listing the names.
                self.add(chain, info.filename, None, depth, encrypted=True)
                self.problem(
                    UNDECIPHERABLE, f"encrypted member {_clean_name(info.filename)!r} in {where}"
                )
                continue
            if info.is_dir():
                self.add(chain, info.filename, b"", depth)
                continue
            self.add(chain, info.filename, self.zip_member(data, info, where), depth)

    def zip_unicode_names(self, data: bytes, info: zipfile.ZipInfo) -> list[str]:
        """The names the entry's Info-ZIP Unicode Path extra fields (0x7075) give it, in
        the central directory and in the local header. unzip, 7-Zip and libarchive
        extract the entry under such a name; zipfile ignores the field. Every one is
        taken, whether or not its CRC of the header name matches."""
        offset = info.header_offset
        name_length, extra_length = struct.unpack_from("<2H", data, offset + 26)
        local_extra = data[offset + 30 + name_length : offset + 30 + name_length + extra_length]
        names: list[str] = []
        for extra in (info.extra, local_extra):
            for field_id, body in _extra_fields(extra):
                # Version 1, CRC-32 of the header name, then the UTF-8 name.
                if field_id == 0x7075 and len(body) > 5:
                    name = body[5:].decode("utf-8", "replace")
                    if name not in names:
                        names.append(name)
        return names

    def zip_span(self, data: bytes, info: zipfile.ZipInfo, where: str) -> tuple[int, int, int]:
        """Where the entry's local header and compressed bytes really are."""
        offset = info.header_offset
        try:
            header = _LOCAL_HEADER.unpack_from(data, offset)
        except struct.error:
            raise self.stop(UNDECIPHERABLE, f"truncated zip {where}") from None
        if header[0] != b"PK\x03\x04":
            raise self.stop(UNDECIPHERABLE, f"corrupt zip {where}: bad local header")
        name_length, extra_length = header[10], header[11]
        local_name = data[offset + 30 : offset + 30 + name_length]
        if local_name != info.orig_filename.encode(
            "utf-8" if info.flag_bits & 0x800 else "cp437", "replace"
        ):
            raise self.stop(
                UNDECIPHERABLE,
                f"zip {where}: local header names {local_name!r}, central "
                f"directory names {info.orig_filename!r}",
            )
        start = offset + 30 + name_length + extra_length
        end = start + info.compress_size
        if end > len(data):
            raise self.stop(UNDECIPHERABLE, f"truncated zip {where}: member extends past end")
        return offset, start, end

    def zip_member(self, data: bytes, info: zipfile.ZipInfo, where: str) -> bytes:
        _, start, end = self.zip_span(data, info, where)
        raw = data[start:end]
        label = f"{where}/{_clean_name(info.filename)}"
        if info.compress_type == zipfile.ZIP_STORED:
            self.check_growth(len(raw), len(raw), label)
            self.total += len(raw)
            out = raw
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            out = self.inflate_zlib(raw, -15, label, members=False)
        elif info.compress_type == zipfile.ZIP_BZIP2:
            out = self.inflate_buffered(bz2.BZ2Decompressor, raw, label, b"BZh")
        else:
            raise self.stop(
                UNDECIPHERABLE, f"unsupported compression method {info.compress_type} in {label}"
            )
        if len(out) > info.file_size:
            raise self.stop(
                BOMB,
                f"member {label} expands beyond its declared size "
                f"({len(out)} > {info.file_size} bytes)",
            )
        if len(out) < info.file_size or zlib.crc32(out) != info.CRC:
            raise self.stop(UNDECIPHERABLE, f"corrupt zip member {label} (size or CRC)")
        return out

    # -- tar --------------------------------------------------------------------------
    def list_tar(self, data: bytes, chain: tuple[str, ...], depth: int) -> None:
        where = "/".join(chain)
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
                for info in archive:
                    self.tick()
                    name = info.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                    if not info.isreg():
                        self.add(chain, name, b"", depth)
                        continue
                    stream = archive.extractfile(info)
                    room = self.limits.max_total_bytes - self.total
                    content = stream.read(room + 1) if stream is not None else b""
                    self.check_growth(len(content), len(content), f"{where}/{name}")
                    self.total += len(content)
                    self.add(chain, name, content, depth)
        except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeError) as exc:
            raise self.stop(UNDECIPHERABLE, f"corrupt tar {where}: {exc}") from exc


def _extra_fields(extra: bytes) -> list[tuple[int, bytes]]:
    """The (id, data) fields of a zip extra block; a field running past the end is cut."""
    fields = []
    pos = 0
    while pos + 4 <= len(extra):
        field_id, size = struct.unpack_from("<2H", extra, pos)
        fields.append((field_id, extra[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return fields


def _zip_announced_entries(data: bytes) -> int | None:
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65557))
    if end < 0 or end + 22 > len(data):
        return None
    (entries,) = struct.unpack_from("<H", data, end + 10)
    return None if entries == 0xFFFF else entries


def _gzip_name(data: bytes) -> str | None:
    """The original file name a gzip header carries (FNAME), if any."""
    if len(data) < 10 or not data[3] & 0x08:
        return None
    pos = 10
    if data[3] & 0x04:
        if len(data) < 12:
            return None
        pos += 2 + int.from_bytes(data[10:12], "little")
    end = data.find(b"\x00", pos, pos + 1024)
    return data[pos:end].decode("latin-1") if end > pos else None


def _inner_name(outer: str, suffixes: tuple[str, ...], recorded: str | None) -> str:
    """The name of what a compressed file named `outer` holds: the name its header
    records, else `outer` less its suffix, else `outer` + ".out"."""
    return recorded or _stripped_name(outer, suffixes) or outer + ".out"


def _stripped_name(outer: str, suffixes: tuple[str, ...]) -> str | None:
    """`outer` less the first of `suffixes` it ends with (case-insensitively) as the
    decompressor names its output (".tgz" gives ".tar"); None if it ends with none."""
    lowered = outer.lower()
    for suffix in suffixes:
        if lowered.endswith(suffix):
            stem = outer[: -len(suffix)]
            return stem + ".tar" if suffix.startswith(".t") else stem
    return None
