"""Hostile content the other content-check tests do not cover.

Each test builds real bytes (messages, zip/tar/gzip archives) and runs the real parser,
archive lister and checks on them. Each one states in its docstring what the filter must
do. Where the test is about a name a client honours, the docstring names the client or tool
that honours it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import io
import os
import struct
import tarfile
import time
import zipfile
import zlib

import pytest

from mailfilter.checks.banned import check_banned
from mailfilter.mime import parse_message
from mailfilter.policy import BUILTIN_DEFAULT_PROFILE, CheckPolicy, Envelope
from tests.mailfilter.test_banned import zip_of

HEAD = b"From: a@example.com\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: t\r\n"
SCRIPT = b'WScript.Echo("hello");\r\n'
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# Findings that mean the hidden executable name was seen, or the container was refused.
CAUGHT = {"executable-name", "double-extension", "archive-undecipherable", "archive-bomb"}


def multipart(*parts: bytes, boundary: bytes = b"B") -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    return (
        HEAD
        + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="'
        + boundary
        + b'"\r\n\r\n'
        + body
        + b"--"
        + boundary
        + b"--\r\n"
    )


def attachment(headers: bytes, data: bytes) -> bytes:
    return headers + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(data)


def findings(raw: bytes) -> set[str]:
    return {finding.name for finding in check_banned(parse_message(raw))}


# -- time ------------------------------------------------------------------------------


def test_many_uuencode_begin_lines_in_a_text_part_are_parsed_in_linear_time():
    """A 65 kB text/plain body of 4000 `begin 644 a.txt` lines must parse (and be
    checked) well under 2 s. `_embedded_files` splits the whole rest of the text into lines
    again for every `begin` line and then uudecodes all of them, so the work grows with
    the square of the number of lines (about 8 s here, 28 s at 130 kB). The check runs on
    the event loop for messages under `inline_limit`, so this stalls every session of the
    worker; the parse budget is not looked at inside `_embedded_files` either."""
    raw = HEAD + b"\r\n" + b"begin 644 a.txt\n" * 4000 + b"x" * 1000 + b"\n"
    assert len(raw) < 100_000
    start = time.monotonic()
    parsed = parse_message(raw)
    check_banned(parsed)
    assert time.monotonic() - start < 2.0


def test_many_yenc_begin_lines_in_a_text_part_are_parsed_in_linear_time():
    """A 70 kB text/plain body of 2000 `=ybegin ... name=a.txt` lines without `=yend`
    must parse well under 2 s. Each `=ybegin` decodes everything up to the end of the text
    byte by byte in Python, so the work is quadratic (about 3.6 s here)."""
    raw = HEAD + b"\r\n" + b"=ybegin line=128 size=1 name=a.txt\n" * 2000 + b"x" * 1000 + b"\n"
    assert len(raw) < 100_000
    start = time.monotonic()
    parsed = parse_message(raw)
    check_banned(parsed)
    assert time.monotonic() - start < 2.0


# -- names clients honour that the filter does not read ----------------------------------


def test_an_encoded_word_longer_than_1024_characters_is_still_decoded():
    """`filename="=?UTF-8?Q?<120 CJK characters>.js?="` is 1101 characters as written and
    names `请请...请.js` (a name Windows accepts: 123 characters). Python's own
    `email.header.decode_header` and mail clients decode an encoded word of any length;
    the filter's `_ENCODED_WORD` allows at most 1024 characters of encoded text, so the
    word stays undecoded, its "extension" is `js?=` and the script passes. Expected: the
    decoded name is judged and the .js is banned."""
    name = "请" * 120 + ".js"
    word = "=?UTF-8?Q?" + "".join(f"={byte:02X}" for byte in name.encode()) + "?="
    assert len(word) > 1024
    raw = multipart(
        attachment(
            b"Content-Type: application/octet-stream\r\n"
            b'Content-Disposition: attachment; filename="' + word.encode() + b'"',
            SCRIPT,
        )
    )
    assert findings(raw) & CAUGHT


@pytest.mark.parametrize("header", [b"Content-Name", b"X-Sun-Data-Name"])
def test_a_name_given_only_in_content_name_or_x_sun_data_name_is_judged(header):
    """Thunderbird's `MimeHeaders_get_name` takes the attachment name from
    Content-Disposition filename, else Content-Type name, else a `Content-Name:` header,
    else an `X-Sun-Data-Name:` header. A part named only by one of the last two is saved as
    `evil.js`; the filter reads neither header and passes it. Expected: those headers are
    name variants too, and the .js is banned."""
    raw = multipart(
        attachment(b"Content-Type: application/octet-stream\r\n" + header + b": evil.js", SCRIPT)
    )
    assert findings(raw) & CAUGHT


# -- files embedded in text parts ---------------------------------------------------------


def _uuencode(name: bytes, data: bytes) -> bytes:
    lines = b"".join(binascii.b2a_uu(data[i : i + 45]) for i in range(0, len(data), 45))
    return b"begin 644 " + name + b"\n" + lines + b"`\nend\n"


def _yencode(name: bytes, data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
        coded = (byte + 42) % 256
        if coded in (0x00, 0x0A, 0x0D, 0x3D):
            out += bytes([0x3D, (coded + 64) % 256])
        else:
            out.append(coded)
    body = b"\n".join(bytes(out[i : i + 128]) for i in range(0, len(out), 128))
    header = b"=ybegin line=128 size=%d name=" % len(data) + name + b"\n"
    return header + body + b"\n=yend size=%d\n" % len(data)


@pytest.mark.parametrize("encode", [_uuencode, _yencode], ids=["uuencode", "yenc"])
def test_an_archive_embedded_in_a_text_part_is_listed(encode):
    """A text/plain body carrying `docs.zip` uuencoded (or yEnc-encoded), the zip holding
    `evil.js`. Thunderbird shows such blocks as attachments. The parser decodes the file
    and judges its name (`docs.zip`, harmless) and sniffed type, but `check_banned` lists
    archives only for MIME parts (`parsed.listing(part)`), never for embedded files, so the
    script inside is never seen (and the virus scan never gets the members either).
    Expected: embedded archives are listed and their members judged like a part's."""
    archive = zip_of({"evil.js": SCRIPT})
    raw = HEAD + b"\r\nSee the attached documents.\n\n" + encode(b"docs.zip", archive)
    parsed = parse_message(raw)
    assert [embedded.name for part in parsed.walk() for embedded in part.embedded] == [
        "docs.zip"
    ]
    assert findings(raw) & CAUGHT


# -- archives -----------------------------------------------------------------------------


def _zip_with_unicode_path(legacy: bytes, real: str, data: bytes) -> bytes:
    """One stored entry whose header name is `legacy` and whose Info-ZIP Unicode Path
    extra field (0x7075, with the CRC of `legacy` as the format requires) says `real`."""
    upath = real.encode()
    extra = struct.pack("<HHB", 0x7075, 5 + len(upath), 1) + struct.pack("<I", zlib.crc32(legacy))
    extra += upath
    crc = zlib.crc32(data)
    local = struct.pack(
        "<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, len(data), len(data),
        len(legacy), len(extra),
    ) + legacy + extra + data
    central = struct.pack(
        "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, crc, len(data), len(data),
        len(legacy), len(extra), 0, 0, 0, 0, 0,
    ) + legacy + extra
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local), 0)
    return local + central + end


def test_a_zip_entry_renamed_by_a_unicode_path_extra_field_is_judged_by_that_name():
    """A zip entry whose header names `readme.txt` but whose Info-ZIP Unicode Path extra
    field (0x7075) names `evil.js`. Info-ZIP `unzip` (checked: `unzip -l` lists and
    extracts `evil.js`), 7-Zip and libarchive use the Unicode Path name; Python 3.11's
    `zipfile` ignores the field, so the filter judges only `readme.txt`. Expected: the
    Unicode Path name is judged too (or such an entry is undecipherable)."""
    archive = _zip_with_unicode_path(b"readme.txt", "evil.js", SCRIPT)
    assert zipfile.ZipFile(io.BytesIO(archive)).namelist() == ["readme.txt"]
    raw = multipart(
        attachment(b'Content-Type: application/zip; name="docs.zip"', archive)
    )
    assert findings(raw) & CAUGHT


def test_a_zip_with_bytes_before_its_first_entry_is_listed_or_refused():
    """A zip with 16 bytes of junk in front (the self-extractor layout). Python's own
    `zipfile`, Info-ZIP `unzip` (with a warning), 7-Zip and WinRAR all open it and find
    `evil.js`; the filter sniffs by the first bytes only, so the part is not an archive
    to it, is never listed, and nothing is reported. Expected: it is listed (zipfile can)
    or at least reported as undecipherable, never passed unseen."""
    archive = b"JUNKJUNKJUNKJUNK" + zip_of({"evil.js": SCRIPT})
    assert zipfile.ZipFile(io.BytesIO(archive)).namelist() == ["evil.js"]
    raw = multipart(attachment(b'Content-Type: application/zip; name="docs.zip"', archive))
    assert findings(raw) & CAUGHT


def _v7_tar(name: str, data: bytes) -> bytes:
    """A pre-POSIX (v7) tar: no "ustar" magic at offset 257."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    raw = bytearray(buffer.getvalue())
    raw[257:345] = b"\0" * 88  # magic, version, owner and group names
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    return bytes(raw)


def test_an_old_style_tar_inside_a_gzip_is_listed():
    """`docs.tar.gz` whose tar has v7 headers (no "ustar" magic), holding `evil.js`.
    GNU tar, bsdtar/libarchive (also Windows' tar.exe), 7-Zip and Python's `tarfile` all
    read it. The gzip layer is inflated, but the inner `docs.tar` is sniffed by the magic
    at offset 257 only, so it is kept as an unknown blob: no listing, no finding.
    Expected: the tar is listed (tarfile can) and the script banned, or the member is
    reported as undecipherable."""
    tar = _v7_tar("evil.js", SCRIPT)
    assert tarfile.open(fileobj=io.BytesIO(tar)).getnames() == ["evil.js"]
    raw = multipart(
        attachment(b'Content-Type: application/gzip; name="docs.tar.gz"', gzip.compress(tar))
    )
    assert findings(raw) & CAUGHT


def _gzip_named(data: bytes, recorded: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = compressor.compress(data) + compressor.flush()
    header = b"\x1f\x8b\x08\x08" + b"\0" * 4 + b"\x00\xff" + recorded + b"\0"
    return header + body + struct.pack("<II", zlib.crc32(data), len(data))


def test_a_gzip_is_judged_by_the_name_gunzip_gives_it_not_only_by_its_header():
    """`invoice.js.gz` whose gzip header records the original name `invoice.txt`.
    `gunzip invoice.js.gz` (no -N) writes `invoice.js` (checked); the filter names the
    member after the FNAME field only (`_inner_name` returns `recorded` when present), so
    it judges `invoice.txt` and passes the script. Expected: both the recorded name and
    the name derived from the attachment are judged."""
    raw = multipart(
        attachment(
            b'Content-Type: application/gzip; name="invoice.js.gz"',
            _gzip_named(SCRIPT, b"invoice.txt"),
        )
    )
    assert findings(raw) & CAUGHT


def test_eicar_in_an_archive_member_over_the_kept_size_is_not_passed_as_clean():
    """A 4.3 MB zip (5.9 MB message) whose single 26 MB text member starts with EICAR.
    Every cap is respected (ratio about 6:1, total under 100 MB), but the member is larger
    than `max_kept_bytes` (25 MB), so `Member.data` is None and `_analyse` leaves it out of
    the signature scan without saying so: the built-in default profile passes the message
    as clean. (A 20 MB member is found.) Expected: a member too large to keep is still
    scanned (e.g. while it streams) or reported as not scanned, so the message is held,
    never passed."""
    flip = bytes(b"ab"[i & 1] for i in range(256))
    member = EICAR + b"\n" + os.urandom(26 * 2**20).translate(flip)
    archive = zip_of({"notes.txt": member})
    raw = multipart(
        attachment(b'Content-Type: application/zip; name="notes.zip"', archive)
    )
    assert len(raw) < 10 * 2**20
    verdict = asyncio.run(
        CheckPolicy().decide(
            raw, Envelope("a@example.com", ["b@example.com"]), BUILTIN_DEFAULT_PROFILE
        )
    )
    assert verdict.category in ("VIRUS", "BANNED")
    assert verdict.destiny != "pass"
