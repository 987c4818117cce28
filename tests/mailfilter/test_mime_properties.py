"""Properties over generated input (security-tests cases 112, 113).

Any bytes parse to a ParsedMessage without an exception, a banned name is found
whatever way its parameter is encoded, and a single-part message parses the same whether
its tree comes from the structure scan or from Python's parser.
"""

from __future__ import annotations

import base64
import urllib.parse
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfilter import mime
from mailfilter.checks.banned import check_banned
from mailfilter.checks.headers import check_headers
from mailfilter.mime import parse_message

HEAD = b"From: a@example.com\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"

mime_fragments = st.sampled_from(
    [
        b"Content-Type: multipart/mixed; boundary=B\r\n",
        b'Content-Type: multipart/mixed; boundary="B"; boundary="C"\r\n',
        b"Content-Type: multipart/mixed; boundary*0=B; boundary*1*=%41\r\n",
        b"Content-Type: message/rfc822\r\n",
        b"Content-Type: message/delivery-status\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        b"Content-Transfer-Encoding: x-uuencode\r\n",
        b"Content-Disposition: attachment; filename*=utf-8'en'%E2%80%AE.exe\r\n",
        b"Subject: =?utf-8?b?////?= =?x-unknown?q?=ZZ?=\r\n",
        b"\r\n",
        b"--B\r\n",
        b"--B--\r\n",
        b"--C\r\n",
        b"begin 644 a.exe\r\n",
        b"=ybegin name=x.exe\r\n",
        b" \r\n",
        b"\r",
        b"\x00\xff\x80",
        b"PK\x03\x04",
        b"\x1f\x8b\x08\x00",
        b"MZ",
    ]
)
messages = st.lists(st.one_of(mime_fragments, st.binary(max_size=40)), max_size=60).map(b"".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_any_bytes_parse_to_a_message_and_every_check_runs(raw):
    parsed = parse_message(raw)
    assert parsed.parts
    check_banned(parsed, filename_reject=[".exe"], mime_reject=["application/zip"])
    list(parsed.scan_blobs())


def encodings(name: str) -> dict[str, bytes]:
    quoted = urllib.parse.quote(name.encode(), safe="")
    half = len(name) // 2
    word = base64.b64encode(name.encode()).decode()
    return {
        "plain": f'filename="{name}"',
        "rfc2047": f'filename="=?UTF-8?B?{word}?="',
        "rfc2231": f"filename*=UTF-8''{quoted}",
        "continuation": f'filename*0="{name[:half]}"; filename*1="{name[half:]}"',
        "encoded-continuation": (
            f"filename*0*=UTF-8''{urllib.parse.quote(name[:half].encode(), safe='')}; "
            f"filename*1*={urllib.parse.quote(name[half:].encode(), safe='')}"
        ),
        "content-type-name": f'x; name="{name}"',
    }


stems = st.text(
    alphabet=st.characters(
        whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters="-_ é", max_codepoint=0x24F
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=150, deadline=None)
@given(stems, st.sampled_from(["exe", "EXE", "pdf.exe", "scr", "exe.", "exe  "]))
def test_a_banned_name_is_found_whatever_its_encoding(stem, extension):
    name = f"{stem}.{extension}"
    for encoding, params in encodings(name).items():
        if encoding == "content-type-name":
            header = f'Content-Type: application/octet-stream; name="{name}"\r\n'
        else:
            header = (
                "Content-Type: application/octet-stream\r\n"
                f"Content-Disposition: attachment; {params}\r\n"
            )
        raw = HEAD + b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        raw += header.encode() + b"\r\ndata\r\n--B--\r\n"
        found = {f.name for f in check_banned(parse_message(raw))}
        assert found & {"executable-name", "double-extension"}, (encoding, name)


def test_every_message_of_cpythons_email_test_corpus_parses_and_is_checked():
    """The corpus ships with CPython's test package, which some installs leave out."""
    import importlib.util
    from pathlib import Path

    import pytest

    spec = importlib.util.find_spec("test.test_email")
    if spec is None or spec.origin is None:
        pytest.skip("CPython's email test corpus is not installed")
    files = sorted((Path(spec.origin).parent / "data").glob("msg_*.txt"))
    assert files
    for path in files:
        parsed = parse_message(path.read_bytes())
        assert parsed.parts, path.name
        check_banned(parsed)


# Header lines and bodies for messages that are mostly one part: clean and broken header
# sections, every line ending, 8-bit values and bodies, and types the parser treats apart.
header_lines = st.sampled_from(
    [
        b"From: a@example.com",
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000",
        b"Subject: =?utf-8?q?caf=C3=A9?= =?utf-8?b?////?=",
        b"Subject: caf\xc3\xa9",
        b"Content-Type: text/plain; charset=iso-8859-1",
        b'Content-Type: TEXT/HTML; charset="utf-8"; format=flowed',
        b"Content-Type: text/plain; charset=x-unknown",
        b"Content-Type: text",
        b"Content-Type: \xff/x",
        b'Content-Type: application/octet-stream; name="a;b.exe"',
        b"Content-Type: image/jpeg; name*0=a; name*1=.exe",
        b"Content-Type: multipart/mixed; boundary=B",
        b"Content-Type: multipart/mixed",
        b"Content-Type: message/rfc822",
        b"Content-Type: message/delivery-status",
        b"Content-Transfer-Encoding: base64",
        b"Content-Transfer-Encoding: quoted-printable",
        b"Content-Transfer-Encoding: x-uuencode",
        b"Content-Transfer-Encoding: BINARY ",
        b"Content-Disposition: attachment; filename*=utf-8\'\'%E2%80%AE.exe",
        b"X-Empty:",
        b" continued",
        b"\t",
        b":no-name",
        b"From sender@example.com Mon Jan  1 00:00:00 2024",
        b"not a field",
        b"X-Nul: a\x00b",
    ]
)
line_ends = st.sampled_from([b"\r\n", b"\n", b"\r", b""])
bodies = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"hello\r\n",
                b"caf\xc3\xa9 \xe9\n",
                b"begin 644 a.exe\r\nM86)C\r\n`\r\nend\r\n",
                b"=ybegin line=128 size=3 name=x.exe\r\nabc\r\n=yend\r\n",
                base64.b64encode(b"MZ" + bytes(80)) + b"\r\n",
                b"=41=ZZ=\r\n",
                b"--B\r\n",
                b"\r",
            ]
        ),
        st.binary(max_size=20),
    ),
    max_size=8,
).map(b"".join)


@st.composite
def single_part_messages(draw) -> bytes:
    lines = draw(st.lists(st.tuples(header_lines, line_ends), max_size=8))
    head = b"".join(line + end for line, end in lines)
    return head + draw(st.sampled_from([b"\r\n", b"\n", b""])) + draw(bodies)


def seen(parsed: mime.ParsedMessage) -> tuple:
    """All a check can look at, without the deadline and the listing cache."""
    return (
        parsed.headers,
        parsed.parts,
        parsed.defects,
        parsed.texts,
        check_banned(parsed, filename_reject=[".exe"], mime_reject=["text/*"]),
        check_headers(parsed),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(single_part_messages())
def test_a_message_parses_the_same_without_the_structure_scans_tree(raw):
    fast = seen(parse_message(raw))
    with mock.patch.object(mime, "_single_part_tree", return_value=None):
        assert seen(parse_message(raw)) == fast


def test_a_plain_single_part_message_is_parsed_without_pythons_parser():
    raw = HEAD + b"Subject: plain\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
    with mock.patch.object(mime, "BytesParser", side_effect=AssertionError("parser called")):
        parsed = parse_message(raw)
    assert parsed.defects == []
    [part] = parsed.parts
    assert (part.content_type, part.payload) == ("text/plain", b"hello\r\n")
    assert parsed.header("Subject") == "plain"
