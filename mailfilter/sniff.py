"""What a blob of bytes is, by its content rather than by what the mail claims.

Only the types the checks act on are recognised: executables (so that an `MZ` file named
`photo.jpg` is still an executable), archives (so that they can be listed) and the
containers that cannot be looked into. Types are returned as MIME type strings, which is
what `mime_reject` rules are written in.
"""

from __future__ import annotations

import re
import struct

DOS_EXECUTABLE = "application/x-dosexec"
ELF_EXECUTABLE = "application/x-executable"
MACH_O_EXECUTABLE = "application/x-mach-binary"
SCRIPT = "text/x-shellscript"
ZIP = "application/zip"
GZIP = "application/gzip"
BZIP2 = "application/x-bzip2"
XZ = "application/x-xz"
TAR = "application/x-tar"
RAR = "application/vnd.rar"
SEVEN_ZIP = "application/x-7z-compressed"
OLE = "application/x-ole-storage"
TNEF = "application/vnd.ms-tnef"

EXECUTABLES = frozenset({DOS_EXECUTABLE, ELF_EXECUTABLE, MACH_O_EXECUTABLE})
LISTABLE_ARCHIVES = frozenset({ZIP, GZIP, BZIP2, XZ, TAR})
OPAQUE_ARCHIVES = frozenset({RAR, SEVEN_ZIP})

_MACH_O_MAGICS = (
    b"\xfe\xed\xfa\xce",
    b"\xfe\xed\xfa\xcf",
    b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",  # universal binary (also a Java class file: executable either way)
)
_TEXT_BYTES = frozenset(b"\t\n\r\f\b") | frozenset(range(0x20, 0x7F))
# A tar checksum field: octal digits, padded with spaces, ended by NUL or space.
_TAR_CHECKSUM = re.compile(rb" *[0-7]{1,7}[ \0]*\Z")
# Bytes a tar member name is made of: printable ASCII, and 8-bit for UTF-8 or legacy names.
_NAME_BYTES = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
# The end-of-central-directory record (22 bytes) is followed by at most a 64 KiB comment.
_ZIP_END_SEARCH = 0xFFFF + 22


def sniff(data: bytes) -> str | None:
    """The MIME type of `data` by its magic, or None when it is none of ours."""
    if data[:2] == b"MZ" and _looks_like_dos_executable(data):
        return DOS_EXECUTABLE
    if data[:4] == b"\x7fELF":
        return ELF_EXECUTABLE
    if data[:4] in _MACH_O_MAGICS:
        return MACH_O_EXECUTABLE
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return ZIP
    if data[:2] == b"\x1f\x8b":
        return GZIP
    if data[:3] == b"BZh" and data[3:4].isdigit():
        return BZIP2
    if data[:6] == b"\xfd7zXZ\x00":
        return XZ
    if data[:6] == b"Rar!\x1a\x07":
        return RAR
    if data[:6] == b"7z\xbc\xaf\x27\x1c":
        return SEVEN_ZIP
    if data[:8] == b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1":
        return OLE
    if data[:4] == b"\x78\x9f\x3e\x22":
        return TNEF
    if data[257:262] == b"ustar" or _looks_like_old_tar(data):
        return TAR
    if data[:2] == b"#!":
        return SCRIPT
    if _has_zip_end_record(data):
        return ZIP
    return None


def _looks_like_old_tar(data: bytes) -> bool:
    """A tar header without the "ustar" magic (v7 tar, which GNU tar, bsdtar, 7-Zip and
    Python's tarfile all read): a non-empty name of printable (or 8-bit) bytes, and a
    checksum field in octal that equals the sum of the header's bytes (the field counted
    as spaces), unsigned or signed as tar readers accept."""
    if len(data) < 512 or not _TAR_CHECKSUM.match(data, 148, 156):
        return False
    name = data[:100].split(b"\0", 1)[0]
    if not name or name.translate(None, _NAME_BYTES):
        return False
    written = int(data[148:156].split(b"\0", 1)[0].strip(), 8)
    header = data[:148] + b" " * 8 + data[156:512]
    unsigned = sum(header)
    signed = unsigned - 256 * sum(1 for byte in header if byte > 127)
    return written in (unsigned, signed)


def _has_zip_end_record(data: bytes) -> bool:
    """A zip whose first entry is not at the start (a self-extractor stub or other bytes in
    front, which zipfile, unzip and 7-Zip skip): an end-of-central-directory record in the
    last 64 KiB + 22 bytes whose central directory, just before it, starts with a
    central directory header (or is empty), or that a zip64 locator precedes."""
    start = max(0, len(data) - _ZIP_END_SEARCH)
    # A one-byte search is many times faster than a four-byte one, and rules out text.
    if data.find(b"\x05", start) < 0:
        return False
    end = data.rfind(b"PK\x05\x06", start)
    if end < 0 or end + 22 > len(data):
        return False
    if end >= 20 and data[end - 20 : end - 16] == b"PK\x06\x07":
        return True
    (size,) = struct.unpack_from("<L", data, end + 12)
    if size == 0:
        return data[end + 8 : end + 12] == b"\0\0\0\0"
    return size <= end and data[end - size : end - size + 4] == b"PK\x01\x02"


def _looks_like_dos_executable(data: bytes) -> bool:
    # "MZ" also starts ordinary words ("MZ is ..."): require either the PE header the DOS
    # stub points to, or a binary-looking DOS header.
    if len(data) >= 0x40:
        (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
        if pe_offset + 4 <= len(data) and data[pe_offset : pe_offset + 4] == b"PE\x00\x00":
            return True
    head = data[2:64]
    return len(head) >= 26 and any(byte not in _TEXT_BYTES for byte in head)
