"""What a blob of bytes is, by its content rather than by what the mail claims.

Only the types the checks act on are recognised: executables (so that an `MZ` file named
`photo.jpg` is still an executable), archives (so that they can be listed) and the
containers that cannot be looked into. Types are returned as MIME type strings, which is
what `mime_reject` rules are written in.
"""

from __future__ import annotations

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
    if data[257:262] == b"ustar":
        return TAR
    if data[:2] == b"#!":
        return SCRIPT
    return None


def _looks_like_dos_executable(data: bytes) -> bool:
    # "MZ" also starts ordinary words ("MZ is ..."): require either the PE header the DOS
    # stub points to, or a binary-looking DOS header.
    if len(data) >= 0x40:
        (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
        if pe_offset + 4 <= len(data) and data[pe_offset : pe_offset + 4] == b"PE\x00\x00":
            return True
    head = data[2:64]
    return len(head) >= 26 and any(byte not in _TEXT_BYTES for byte in head)
