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
    plain = 0
    for path in files:
        raw = path.read_bytes()
        parsed = parse_message(raw)
        assert parsed.parts, path.name
        check_banned(parsed)
        # The tree built without Python's parser, where it is, is the parser's own.
        for variant in (raw, raw.replace(b"\n", b"\r\n")):
            plain += _plain_tree_of(variant) is not None
            with mock.patch.object(mime, "_plain_tree", return_value=None):
                assert seen(parse_message(variant)) == seen(parse_message(variant)), path.name
    assert plain > len(files) // 2


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
    with mock.patch.object(mime, "_plain_tree", return_value=None):
        assert seen(parse_message(raw)) == fast


def test_a_plain_single_part_message_is_parsed_without_pythons_parser():
    raw = HEAD + b"Subject: plain\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
    with mock.patch.object(mime, "BytesParser", side_effect=AssertionError("parser called")):
        parsed = parse_message(raw)
    assert parsed.defects == []
    [part] = parsed.parts
    assert (part.content_type, part.payload) == ("text/plain", b"hello\r\n")
    assert parsed.header("Subject") == "plain"


def _plain_tree_of(raw: bytes):
    structure = mime._Structure(raw, mime.DEFAULT_LIMITS)
    try:
        structure.scan()
    except mime._Exceeded:
        return None
    return mime._plain_tree(raw, structure)


def tree_state(node) -> tuple:
    """Everything of a parsed tree the walker can reach, recursively."""
    payload = node._payload
    return (
        node.get_unixfrom(),
        list(node.raw_items()),
        node.preamble,
        node.epilogue,
        [type(defect) for defect in node.defects],
        node.get_default_type(),
        [tree_state(child) for child in payload] if isinstance(payload, list) else payload,
    )


# Multiparts that are mostly plain, with now and then a line the parser reads its own way:
# boundaries that are prefixes of each other, boundary lines with trailing white space
# or text, parts without a header section or its empty line, encoded and digest
# multiparts, message/* parts, header lines that are not fields, and every line end.
boundary_names = st.sampled_from(["B", "B-", "B--", "b:1", "=_x y"])
plain_header_lines = st.sampled_from(
    [
        b"Content-Type: text/plain",
        b"Content-Type: text/html; charset=utf-8",
        b"Content-Type: application/pdf; name=a.pdf",
        b"Content-Transfer-Encoding: base64",
        b"Content-Disposition: attachment;",
        b"\tfilename=a.exe",
        b"X-8bit: caf\xc3\xa9",
    ]
)
odd_header_lines = st.sampled_from(
    [
        b"Content-Type: message/rfc822",
        b"Content-Type: multipart/mixed",
        b" continued first",
        b"From someone",
        b":no-name",
        b"not a field",
        b"--B",
    ]
)
plain_body_lines = st.sampled_from([b"text", b"", b"-- ", b"--", b"QUJD", b"\xff", b"--x"])
odd_body_lines = st.sampled_from(
    [
        b"--B", b"--B--", b"--B  ", b"--B-- \t", b"--B--x", b"--B-", b"--B---", b"--b:1",
        b"--b:1--", b"--=_x y", b"--=_x y--",
    ]
)


@st.composite
def multipart_messages(draw) -> bytes:
    ends = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r"])

    def now_and_then() -> bool:
        return draw(st.integers(0, 15)) == 0

    def lines(plain, odd, most: int) -> bytes:
        count = draw(st.integers(0, most))
        chosen = [draw(odd) if now_and_then() else draw(plain) for _ in range(count)]
        return b"".join(line + draw(ends) for line in chosen)

    def part(depth: int, boundary: bytes) -> bytes:
        if depth < 3 and draw(st.integers(0, 3)) == 0:
            return multipart(depth + 1)
        head = lines(plain_header_lines, odd_header_lines, 3)
        blank = b"" if now_and_then() else draw(ends)
        return head + blank + lines(plain_body_lines, odd_body_lines, 4)

    def multipart(depth: int) -> bytes:
        boundary = draw(boundary_names).encode()
        if not now_and_then():
            # Mostly a boundary of its own: nested multiparts that share one end early.
            boundary += b"%d" % depth
        value = b'"' + boundary + b'"' if draw(st.booleans()) or b" " in boundary else boundary
        subtype = b"digest" if now_and_then() else draw(st.sampled_from([b"mixed", b"related"]))
        head = b"Content-Type: multipart/" + subtype + b"; boundary=" + value + draw(ends)
        if now_and_then():
            encoding = draw(st.sampled_from([b"7bit", b"base64", b"8BIT"]))
            head += b"Content-Transfer-Encoding: " + encoding + draw(ends)
        out = head + draw(ends) + lines(plain_body_lines, odd_body_lines, 2)
        for _ in range(draw(st.integers(0 if now_and_then() else 1, 3))):
            out += b"--" + boundary + draw(st.sampled_from([b"", b"", b" ", b"\t "]))
            out += draw(ends) + part(depth, boundary)
        if not now_and_then():
            out += b"--" + boundary + b"--" + draw(st.sampled_from([b"", b"", b" "]))
            out += draw(st.sampled_from([b"\r\n", b"\n", b"\r", b""]))
            out += lines(plain_body_lines, odd_body_lines, 2)
        return out

    return HEAD + multipart(1)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(multipart_messages())
def test_a_multipart_split_without_pythons_parser_is_split_as_the_parser_splits_it(raw):
    from email.parser import BytesParser
    from email.policy import compat32

    tree = _plain_tree_of(raw)
    if tree is not None:
        assert tree_state(tree) == tree_state(BytesParser(policy=compat32).parsebytes(raw))
    fast = seen(parse_message(raw))
    with mock.patch.object(mime, "_plain_tree", return_value=None):
        assert seen(parse_message(raw)) == fast


def test_a_plain_multipart_message_is_parsed_without_pythons_parser():
    raw = HEAD + (
        b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n"
        b"preamble\r\n"
        b"--outer\r\n"
        b"Content-Type: multipart/alternative; boundary=inner\r\n\r\n"
        b"--inner\r\nContent-Type: text/plain\r\n\r\nhello\r\n-- \r\nsig\r\n"
        b"--inner\r\nContent-Type: text/html\r\n\r\n<p>hello</p>\r\n"
        b"--inner--\r\n"
        b"--outer\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment;\r\n\tfilename=\"a.exe\"\r\n\r\n"
        b"TVqQAAMAAAAEAAAA\r\n"
        b"--outer--\r\nepilogue\r\n"
    )
    from email.parser import BytesParser
    from email.policy import compat32

    assert tree_state(_plain_tree_of(raw)) == tree_state(
        BytesParser(policy=compat32).parsebytes(raw)
    )
    with mock.patch.object(mime, "BytesParser", side_effect=AssertionError("parser called")):
        parsed = parse_message(raw)
    assert parsed.defects == []
    leaves = list(parsed.walk())
    assert [(p.path, p.content_type, p.payload) for p in leaves] == [
        ("1.1", "text/plain", b"hello\r\n-- \r\nsig"),
        ("1.2", "text/html", b"<p>hello</p>"),
        ("2", "application/octet-stream", b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00"),
    ]
    assert leaves[2].filenames == ["a.exe"]
    assert parsed.texts == [
        ("message preamble", b"preamble"), ("message epilogue", b"epilogue\r\n")
    ]
