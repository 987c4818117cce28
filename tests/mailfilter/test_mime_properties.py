"""Properties over generated input (security-tests cases 112, 113).

Any bytes parse to a ParsedMessage without an exception, and a banned name is found
whatever way its parameter is encoded.
"""

from __future__ import annotations

import base64
import urllib.parse

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfilter.checks.banned import check_banned
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
