"""Parsing once with bounded work (security-tests cases 53-59, 62, 64-66)."""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
from contextlib import contextmanager

from mailfilter.mime import parse_message

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
HEAD = b"From: a@example.com\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: t\r\n"


@contextmanager
def finishes_within(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def multipart(*parts: bytes, boundary: bytes = b"B", header: bytes = b"") -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    return (
        HEAD
        + header
        + b'Content-Type: multipart/mixed; boundary="'
        + boundary
        + b'"\r\n\r\npreamble\r\n'
        + body
        + b"--"
        + boundary
        + b"--\r\nepilogue\r\n"
    )


def nested(levels: int) -> bytes:
    opening = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (n, n)
        for n in range(levels)
    )
    closing = b"".join(b"\r\n--b%d--\r\n" % n for n in reversed(range(levels)))
    return HEAD + opening + b"Content-Type: text/plain\r\n\r\ndeep" + closing


def test_leaf_parts_are_walked_in_order_with_decoded_payloads():
    raw = multipart(
        b"Content-Type: text/plain\r\n\r\nhello",
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=a.bin\r\n\r\n"
        + base64.b64encode(b"\x00\x01binary"),
    )
    parsed = parse_message(raw)
    leaves = list(parsed.walk())
    assert [(p.path, p.content_type, p.payload) for p in leaves] == [
        ("1", "text/plain", b"hello"),
        ("2", "application/octet-stream", b"\x00\x01binary"),
    ]
    assert leaves[1].filenames == ["a.bin"]
    assert parsed.defects == []


def test_nested_message_rfc822_parts_are_walked_too():
    inner = multipart(b"Content-Type: text/plain\r\n\r\ninner text", boundary=b"IN")
    raw = multipart(b"Content-Type: message/rfc822\r\n\r\n" + inner)
    parsed = parse_message(raw)
    assert [p.payload for p in parsed.walk()] == [b"inner text"]
    assert [p.path for p in parsed.walk()] == ["1.1.1"]


def test_decoded_headers_replace_encoded_line_breaks():
    """Case 64: an encoded word decoding to CR LF never yields a line break."""
    raw = HEAD.replace(b"Subject: t", b"Subject: =?UTF-8?Q?hello=0D=0ABcc:_victim@example.com?=")
    parsed = parse_message(raw + b"\r\nbody")
    assert parsed.header("subject") == "hello  Bcc: victim@example.com"
    assert "encoded-line-break-in-header" in parsed.defect_names


def test_a_duplicate_boundary_parameter_is_a_defect_python_does_not_report():
    """Case 53: Python silently uses the first boundary; we flag and treat as unscannable."""
    raw = multipart(
        b"Content-Type: text/plain\r\n\r\nvisible",
        boundary=b'AAA"; boundary="BBB',
    ).replace(b'--AAA"; boundary="BBB', b"--AAA")
    parsed = parse_message(raw)
    assert "duplicate-boundary" in parsed.defect_names
    assert [d.name for d in parsed.unscannable] == ["duplicate-boundary"]


def test_empty_boundary_and_boundary_continuations_are_defects():
    """Case 54."""
    empty = HEAD + b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\n\r\nx\r\n----\r\n'
    assert "empty-boundary" in parse_message(empty).defect_names
    continued = (
        HEAD + b'Content-Type: multipart/mixed; boundary*0="AB"; boundary*1="CD"\r\n\r\n'
        b"--ABCD\r\n\r\nx\r\n--ABCD--\r\n"
    )
    assert "boundary-continuation" in parse_message(continued).defect_names


def test_missing_boundaries_and_close_delimiters_are_named_defects():
    """Case 55."""
    no_boundary = HEAD + b"Content-Type: multipart/mixed\r\n\r\nbody\r\n"
    assert "missing-boundary" in parse_message(no_boundary).defect_names
    unclosed = multipart(b"Content-Type: text/plain\r\n\r\nx").replace(b"--B--\r\n", b"")
    assert "missing-close-boundary" in parse_message(unclosed).defect_names
    no_start = HEAD + b"Content-Type: multipart/mixed; boundary=B\r\n\r\nno delimiters\r\n"
    assert "start-boundary-not-found" in parse_message(no_start).defect_names


def test_a_boundary_that_prefixes_another_still_parses_both_parts():
    inner = b'Content-Type: multipart/mixed; boundary="BB"\r\n\r\n--BB\r\n\r\ninner\r\n--BB--'
    parsed = parse_message(multipart(b"\r\nouter", inner))
    assert sorted(p.payload.strip() for p in parsed.walk()) == [b"inner", b"outer"]


def test_500_and_2000_levels_of_nesting_are_refused_before_the_parser_recurses():
    """Case 56: depth cap 64, checked by the structure scan."""
    for levels in (500, 2000):
        with finishes_within(10):
            parsed = parse_message(nested(levels))
        assert "too-deep" in parsed.defect_names
        assert parsed.unscannable
        assert len(parsed.parts) == 1 and parsed.parts[0].payload


def test_60_levels_of_nesting_are_parsed_normally():
    parsed = parse_message(nested(60))
    assert [p.payload for p in parsed.walk()] == [b"deep"]
    assert not parsed.unscannable


def test_message_rfc822_chains_count_as_nesting():
    raw = HEAD + b"Content-Type: message/rfc822\r\n\r\n" * 3000 + b"\r\nend"
    with finishes_within(10):
        parsed = parse_message(raw)
    assert "too-deep" in parsed.defect_names


def test_10000_parts_are_refused_before_python_builds_them():
    """Case 57."""
    raw = multipart(*[b"Content-Type: text/plain\r\n\r\nx"] * 10_000)
    with finishes_within(10):
        parsed = parse_message(raw)
    assert "too-many-parts" in parsed.defect_names


def test_eicar_split_by_junk_in_base64_is_decoded_and_flagged():
    """Case 58: the scanner gets the leniently decoded bytes, the defect is kept."""
    encoded = base64.b64encode(EICAR)
    junky = b"!".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))
    raw = multipart(
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + junky
    )
    parsed = parse_message(raw)
    assert [p.payload for p in parsed.walk()] == [EICAR]
    assert "invalid-base64-characters" in parsed.defect_names


def test_bad_base64_padding_and_length_are_defects():
    raw = multipart(
        b"Content-Transfer-Encoding: base64\r\n\r\nTWFu=TWFu\r\nTW",
    )
    names = parse_message(raw).defect_names
    assert "base64-padding-inside-data" in names
    assert "invalid-base64-padding" in names


def test_a_megabyte_of_malformed_quoted_printable_decodes_in_bounded_time():
    """Case 59: '=' at the end of every line, '=ZZ' escapes."""
    body = b"abc=ZZdef=\r\n" * 90_000
    raw = multipart(b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + body)
    with finishes_within(10):
        parsed = parse_message(raw)
    (part,) = parsed.walk()
    assert part.payload.startswith(b"abc=ZZdefabc=ZZdef")
    assert "bad-quoted-printable" in parsed.defect_names


def test_an_unknown_transfer_encoding_is_a_defect_and_the_bytes_stay_raw():
    parsed = parse_message(multipart(b"Content-Transfer-Encoding: x-weird\r\n\r\nraw bytes"))
    assert [p.payload for p in parsed.walk()] == [b"raw bytes"]
    assert "unknown-transfer-encoding" in parsed.defect_names


def test_every_place_eicar_can_hide_is_offered_to_the_scanner():
    """Case 62 (parser side): body, headers, preamble, epilogue and nested message."""
    raw = (
        multipart(
            b"Content-Type: text/plain\r\n\r\n" + EICAR,
            b"Content-Type: message/rfc822\r\n\r\n" + HEAD + b"\r\n" + EICAR,
            header=b"X-Test: " + EICAR + b"\r\n",
        )
        .replace(b"preamble", EICAR)
        .replace(b"epilogue", b"end " + EICAR)
    )
    blobs = dict(parse_message(raw).scan_blobs())
    assert EICAR in blobs["message"]
    assert blobs["part 1"] == EICAR
    assert blobs["part 2.1"] == EICAR
    assert EICAR in blobs["message preamble"]
    assert EICAR in blobs["message epilogue"]


def test_uuencoded_files_in_text_parts_are_decoded():
    """Case 61 (parser side)."""
    import binascii

    encoded = binascii.b2a_uu(b"MZ payload")
    parsed = parse_message(
        multipart(
            b"Content-Type: text/plain\r\n\r\nsee\r\nbegin 644 tool.exe\r\n"
            + encoded
            + b"`\r\nend\r\n"
        )
    )
    (part,) = parsed.walk()
    assert [(e.name, e.data) for e in part.embedded] == [("tool.exe", b"MZ payload")]


def test_header_bombs_finish_in_bounded_time_with_a_defect():
    """Case 65 and the header caps: many fields, a huge folded field, many addresses."""
    many_fields = HEAD + b"X-A: b\r\n" * 100_000 + b"\r\nbody"
    folded = HEAD + b"X-Big: start\r\n" + b" =?a?q?" * 1_500_000 + b"\r\n\r\nbody"
    addresses = HEAD + b"To: " + b", ".join(b"u%d@example.com" % n for n in range(20_000))
    long_params = HEAD + b"Content-Type: text/plain" + b'; a="x;' * 50_000 + b"\r\n\r\nbody"
    expected = {
        "too-many-headers": many_fields,
        "header-section-too-large": folded,
        "too-many-addresses": addresses + b"\r\n\r\nbody",
        "parameter-header-too-large": long_params,
    }
    for defect, raw in expected.items():
        with finishes_within(10):
            parsed = parse_message(raw)
        assert defect in parsed.defect_names, defect


def test_many_unterminated_encoded_words_decode_in_linear_time():
    raw = HEAD.replace(b"Subject: t", b"Subject: " + b"=?utf-8?q?a" * 80_000) + b"\r\nx"
    with finishes_within(10):
        parsed = parse_message(raw)
    assert parsed.header("subject").startswith("=?utf-8?q?a")


def test_html_with_100000_unclosed_tags_is_just_data():
    """Case 66 (parser side): HTML is never interpreted here."""
    html = b"<div>" * 100_000 + b"<a href='http://" + b"x" * 2**20 + b"'>"
    parsed = parse_message(multipart(b"Content-Type: text/html\r\n\r\n" + html))
    (part,) = parsed.walk()
    assert part.payload == html


def test_garbage_never_raises():
    for raw in (
        b"",
        b"\x00" * 100,
        b"\r\r\r\n\n",
        b"Content-Type: multipart/mixed; boundary=",
        b"--",
    ):
        assert parse_message(raw).parts


def test_importing_the_engine_pulls_in_no_django():
    code = (
        "import sys, mailfilter.mime, mailfilter.archives, mailfilter.checks.banned, "
        "mailfilter.checks.headers; print('django' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
