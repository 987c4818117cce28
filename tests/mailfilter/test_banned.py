"""Banned attachments (security-tests cases 39-52, 60, 61)."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zipfile

import pytest

from mailfilter.checks.banned import check_banned
from mailfilter.mime import parse_message

HEAD = b"From: a@example.com\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: t\r\n"
EXE = b"MZ" + b"\x90" * 58 + struct.pack("<I", 64) + b"PE\x00\x00" + b"\x00" * 64


def multipart(*parts: bytes, boundary: bytes = b"B") -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    return (
        HEAD
        + b'Content-Type: multipart/mixed; boundary="'
        + boundary
        + b'"\r\n\r\n'
        + body
        + b"--"
        + boundary
        + b"--\r\n"
    )


def attachment(params: bytes, data: bytes = b"%PDF-1.4", ctype: bytes = b"application/pdf"):
    import base64

    return (
        b"Content-Type: "
        + ctype
        + b"\r\nContent-Disposition: attachment; "
        + params
        + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(data)
    )


def banned_names(raw: bytes, **rules) -> set[str]:
    return {finding.name for finding in check_banned(parse_message(raw), **rules)}


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_pdf_is_not_banned():
    assert banned_names(multipart(attachment(b'filename="invoice.pdf"'))) == set()


@pytest.mark.parametrize(
    "name",
    [
        b"invoice.pdf.exe",
        b"invoice.pdf   .exe",
        b"invoice.exe.",
        b"invoice.exe   ",
        b"INVOICE.EXE",
        b"invoice.scr",
    ],
)
def test_executable_name_forms_are_banned(name):
    """Case 46."""
    names = banned_names(multipart(attachment(b'filename="' + name + b'"')))
    assert names & {"executable-name", "double-extension"}


def test_a_percent_escape_in_a_name_is_not_decoded():
    """Case 46: `invoice.e%78e` stays as written; no client saves it as an .exe."""
    assert banned_names(multipart(attachment(b'filename="invoice.e%78e"'))) == set()


def test_a_right_to_left_override_in_a_name_is_banned_and_shown_escaped():
    """Case 47."""
    params = b"filename*=UTF-8''invoice%E2%80%AEexe.pdf"
    findings = check_banned(parse_message(multipart(attachment(params))))
    (finding,) = [f for f in findings if f.name == "control-character-in-name"]
    assert "invoice\\u202eexe.pdf" in finding.detail


def test_a_clsid_extension_is_banned():
    """Case 48."""
    name = b"report.{3050F4D8-98B5-11CF-BB82-00AA00BDCE0B}"
    assert "clsid-extension" in banned_names(multipart(attachment(b'filename="' + name + b'"')))


def test_rfc2231_continuations_are_joined_before_judging():
    """Case 49."""
    params = b'filename*0="invoice.pdf"; filename*1=".exe"'
    assert "double-extension" in banned_names(multipart(attachment(params)))


def test_any_banned_variant_of_conflicting_names_bans():
    """Case 50: Python's get_filename() would say safe.txt for both."""
    both_in_disposition = b"filename=\"safe.txt\"; filename*=UTF-8''evil.exe"
    assert "executable-name" in banned_names(multipart(attachment(both_in_disposition)))
    name_in_type = attachment(b'filename="safe.txt"', ctype=b'application/pdf; name="evil.exe"')
    assert "executable-name" in banned_names(multipart(name_in_type))


def test_rfc2047_names_are_decoded_and_newlines_removed():
    """Case 51."""
    encoded = b'filename="=?UTF-8?B?ZXZpbC5leGU=?="'
    assert "executable-name" in banned_names(multipart(attachment(encoded)))
    newline = b'filename="=?UTF-8?Q?evil=0D=0A.exe?="'
    parsed = parse_message(multipart(attachment(newline)))
    (part,) = parsed.walk()
    assert "evil.exe" in part.filenames
    assert all("\n" not in name and "\r" not in name for name in part.filenames)


def test_an_executable_declared_as_a_jpeg_is_banned_by_content():
    """Case 52."""
    raw = multipart(attachment(b'filename="photo.jpg"', EXE, b"image/jpeg"))
    assert "executable-content" in banned_names(raw)
    assert "mime-reject" in banned_names(raw, mime_reject=["application/x-dosexec"])


def test_a_macro_document_under_a_docx_name_is_banned():
    docm = zip_of({"[Content_Types].xml": b"<x/>", "word/vbaProject.bin": b"\xd0\xcf"})
    raw = multipart(attachment(b'filename="report.docx"', docm, b"application/octet-stream"))
    assert "macro-document-disguised" in banned_names(raw)


def test_profile_rules_carry_their_scores():
    raw = multipart(attachment(b'filename="song.PIF"', b"x", b"application/x-wav"))
    findings = check_banned(
        parse_message(raw), filename_reject=[(2.0, ".pif")], mime_reject=["application/x-wav"]
    )
    scored = {(f.name, f.score) for f in findings}
    assert ("filename-reject", 2.0) in scored
    assert ("mime-reject", 1.0) in scored


def test_builtin_rules_can_be_turned_off():
    raw = multipart(attachment(b'filename="a.exe"'))
    assert banned_names(raw, builtin=False) == set()


def test_an_exe_in_a_zip_in_a_tgz_in_a_forwarded_message_is_banned():
    """Case 45."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        inner = zip_of({"evil.exe": EXE})
        info = tarfile.TarInfo("inner.zip")
        info.size = len(inner)
        archive.addfile(info, io.BytesIO(inner))
    forwarded = multipart(
        attachment(b'filename="docs.tgz"', buffer.getvalue(), b"application/gzip"),
        boundary=b"INNER",
    )
    raw = multipart(b"Content-Type: message/rfc822\r\n\r\n" + forwarded)
    findings = check_banned(parse_message(raw))
    details = [f.detail for f in findings if f.name == "executable-name"]
    assert details == ["part 1.1.1: docs.tgz/docs.tar/inner.zip: evil.exe"]
    assert not check_banned(parse_message(raw), allow_banned_in_archives=True)


def test_archive_bombs_are_banned_even_when_archives_may_carry_banned_names():
    """Cases 39-44 reach the verdict as BANNED with the listing's reason."""
    compressor = gzip.compress(bytes(200 * 2**20), compresslevel=1)
    raw = multipart(attachment(b'filename="zeros.gz"', compressor, b"application/gzip"))
    findings = check_banned(parse_message(raw), allow_banned_in_archives=True)
    assert [f.name for f in findings] == ["archive-bomb"]
    assert findings[0].detail.startswith("zip bomb: ratio ")


def test_a_truncated_archive_is_banned_as_undecipherable():
    data = zip_of({"a.txt": b"x" * 5000})[:100]
    raw = multipart(attachment(b'filename="a.zip"', data, b"application/zip"))
    assert "archive-undecipherable" in banned_names(raw)


def test_message_partial_is_banned():
    """Case 60."""
    raw = multipart(
        b'Content-Type: message/partial; id="x@y"; number=1; total=3\r\n\r\n' + HEAD + b"\r\nMZ"
    )
    assert "message-partial" in banned_names(raw)


def test_a_uuencoded_exe_in_a_text_part_is_banned():
    """Case 61: uuencode is decoded and its name judged."""
    import binascii

    text = b"Content-Type: text/plain\r\n\r\nbegin 644 tool.exe\r\n" + binascii.b2a_uu(EXE[:45])
    assert "executable-name" in banned_names(multipart(text + b"`\r\nend\r\n"))


def test_yenc_names_in_text_parts_are_judged():
    text = (
        b"Content-Type: text/plain\r\n\r\n=ybegin line=128 size=3 name=run.bat\r\nabc\r\n=yend\r\n"
    )
    assert "executable-name" in banned_names(multipart(text))


def test_tnef_is_banned_as_undecipherable():
    """Case 61: TNEF is not decoded (documented in checks/banned.py)."""
    raw = multipart(
        attachment(
            b'filename="winmail.dat"', b"\x78\x9f\x3e\x22" + b"\x00" * 20, b"application/ms-tnef"
        )
    )
    assert "undecipherable" in banned_names(raw)


def test_structures_too_deep_to_parse_are_banned_as_unscannable():
    """Cases 53, 56, 57: content that could not be seen is not passed."""
    deep = HEAD + b"Content-Type: message/rfc822\r\n\r\n" * 100 + b"\r\nMZ"
    assert banned_names(deep) == {"unscannable"}
