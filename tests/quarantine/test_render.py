"""The safe plain-text view: decoding, HTML to text, attachments, bounds."""

from __future__ import annotations

import time
from email.message import EmailMessage

import pytest

from quarantine.render import MAX_BODY_CHARS, html_to_text, render_message

HOSTILE_HTML = """<!DOCTYPE html><html><head><title>Title text</title>
<base href="https://evil.example/">
<meta http-equiv="refresh" content="0;url=data:text/html,<script>alert(1)</script>">
<style>body { background: url(https://evil.example/x.png); width: expression(alert(2)); }
@import url(https://evil.example/a.css);</style>
<script>alert(3)</script></head>
<body><p>Dear customer,</p><div>Your invoice &amp; receipt are ready.</div>
<svg onload="alert(4)"><text>svg text</text></svg>
<details ontoggle="alert(5)" open><summary>More</summary>details text</details>
<img src="https://evil.example/pixel.gif" onerror="alert(6)">
<![CDATA[<script>alert(7)</script>]]>
<a href="javascript:alert(8)">Click here</a>
<SCRIPT SRC=//evil.example/x.js></SCRIPT><scr<script>ipt>alert(9)</script>
</body></html>"""


def mail(**parts) -> bytes:
    msg = EmailMessage()
    msg["From"] = parts.pop("from_", "Sender <sender@remote.example>")
    msg["To"] = "alice@example.test"
    msg["Subject"] = parts.pop("subject", "Hello")
    if "html" in parts:
        msg.set_content(parts.pop("html"), subtype="html")
    else:
        msg.set_content(parts.pop("body", "Hello there.\n"))
    for name, (data, ctype) in parts.items():
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()


def test_html_only_message_becomes_readable_text_without_markup():
    rendered = render_message(mail(html=HOSTILE_HTML))

    assert rendered.from_html
    assert "Dear customer," in rendered.body
    assert "Your invoice & receipt are ready." in rendered.body
    assert "Click here" in rendered.body
    assert "details text" in rendered.body
    for bad in ("<script", "alert(3)", "alert(2)", "expression", "@import", "Title text",
                "<svg", "onload", "<meta", "<base", "evil.example", "<img", "javascript:"):
        assert bad not in rendered.body, bad


def test_block_elements_become_line_breaks():
    text = html_to_text("<p>one</p><p>two</p><ul><li>a</li><li>b</li></ul>x<br>y")
    assert text == "one\n\ntwo\n\n- a\n- b\nx\ny"


def test_entities_are_decoded_once():
    assert html_to_text("&lt;script&gt; &amp;amp; &#x41;") == "<script> &amp; A"


def test_plain_text_part_wins_over_html():
    msg = EmailMessage()
    msg.set_content("plain version\n")
    msg.add_alternative("<p>html version</p>", subtype="html")

    rendered = render_message(msg.as_bytes())

    assert "plain version" in rendered.body
    assert "html version" not in rendered.body
    assert not rendered.from_html


@pytest.mark.parametrize("charset,payload,expected", [
    ("iso-8859-1", "caf\xe9".encode("latin-1"), "café"),
    ("utf-7", b"+ADw-script+AD4-", "<script>"),
    ("x-no-such-charset", "d\xc3\xa9j\xc3\xa0".encode("latin-1"), "déjà"),
    ("utf-8", b"bad \xff\xfe bytes", "bad \ufffd\ufffd bytes"),
])
def test_any_charset_is_decoded_with_replacement(charset, payload, expected):
    raw = (b"From: a@remote.example\nSubject: x\nMIME-Version: 1.0\n"
           b"Content-Type: text/plain; charset=" + charset.encode() + b"\n"
           b"Content-Transfer-Encoding: 8bit\n\n" + payload + b"\n")
    assert expected in render_message(raw).body


def test_bidi_and_controls_in_the_body_are_made_visible():
    rendered = render_message(mail(body="invoice\u202egnp.exe\x1b[31m\nnext line\n"))
    assert "invoice<U+202E>gnp.exe<U+001B>[31m\nnext line" in rendered.body


def test_headers_are_decoded_and_cannot_break_lines():
    raw = (b"From: =?utf-8?b?cGF0cmlja0BleGFtcGxlLmNvbQA=?= <evil@remote.example>\n"
           b"To: alice@example.test\n"
           b"Subject: =?UTF-8?Q?hello=0D=0ABcc:_victim@example.com?=\n"
           b"Date: Fri, 20 Nov 2026 10:00:00 +0000\n"
           b"Subject-Raw: \xe9t\xe9\n\nbody\n")
    headers = dict(render_message(raw).headers)

    assert headers["Subject"] == "hello\\r\\nBcc: victim@example.com"
    assert headers["From"] == "patrick@example.com<U+0000> <evil@remote.example>"
    assert headers["Date"] == "Fri, 20 Nov 2026 10:00:00 +0000"


@pytest.mark.parametrize("raw_subject", [b"caf\xc3\xa9", b"caf\xe9"])
def test_eight_bit_header_bytes_are_decoded(raw_subject):
    raw = b"From: a@remote.example\nSubject: " + raw_subject + b"\n\nbody\n"
    assert dict(render_message(raw).headers)["Subject"] == "café"


def test_attachments_are_listed_with_every_name_and_never_shown():
    raw = mail(**{"report.pdf": (b"%PDF-1.4 secret content", "application/pdf")})
    rendered = render_message(raw)

    assert [(a.name, a.content_type, a.size) for a in rendered.attachments] == [
        ("report.pdf", "application/pdf", 23)
    ]
    assert "secret content" not in rendered.body


def test_conflicting_and_encoded_file_names_are_all_shown():
    raw = (b"From: a@remote.example\nSubject: x\nMIME-Version: 1.0\n"
           b"Content-Type: multipart/mixed; boundary=B\n\n--B\n"
           b"Content-Type: text/plain\n\nbody\n--B\n"
           b'Content-Type: application/octet-stream; name="=?UTF-8?B?ZXZpbC5leGU=?="\n'
           b"Content-Disposition: attachment; filename=\"safe.txt\"; "
           b"filename*=UTF-8''invoice%E2%80%AEfdp.exe\n"
           b"Content-Transfer-Encoding: base64\n\nTVqQAA==\n--B\n"
           b'Content-Type: application/octet-stream\n'
           b'Content-Disposition: attachment; filename*0="invoice.pdf"; filename*1=".exe"\n\n'
           b"x\n--B--\n")
    names = [a.name for a in render_message(raw).attachments]

    assert names == ["safe.txt / invoice<U+202E>fdp.exe / evil.exe", "invoice.pdf.exe"]
    assert render_message(raw).attachments[0].size == 4


def test_attached_message_is_listed_not_shown():
    inner = mail(body="inner secret text\n")
    msg = EmailMessage()
    msg.set_content("outer text\n")
    msg.add_attachment(inner, maintype="message", subtype="rfc822")
    rendered = render_message(msg.as_bytes())

    assert "outer text" in rendered.body
    assert "inner secret text" not in rendered.body
    assert [a.content_type for a in rendered.attachments] == ["message/rfc822"]


def test_ten_megabyte_single_line_body_is_truncated_quickly():
    raw = b"From: a@remote.example\nSubject: big\n\n" + b"A" * 10_000_000 + b"\n"
    started = time.monotonic()

    rendered = render_message(raw)

    assert time.monotonic() - started < 3
    assert rendered.truncated
    assert len(rendered.body) == MAX_BODY_CHARS


@pytest.mark.parametrize("unit", ["<", "<a ", "<!--", "<![", "</", "<script>", "<a b='"])
def test_hostile_html_is_converted_in_bounded_time(unit):
    # Python 3.11's html.parser needs minutes for 100k "<a " and raises on "<![<![".
    markup = unit * 100_000
    started = time.monotonic()

    text = html_to_text(markup)

    assert time.monotonic() - started < 2
    assert "<script" not in text


def test_deeply_nested_multipart_does_not_break_the_view():
    depth = 300
    raw = b"From: a@remote.example\nSubject: deep\nMIME-Version: 1.0\n"
    for i in range(depth):
        raw += b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i)
    raw += b"Content-Type: text/plain\n\ninnermost\n"
    rendered = render_message(raw)

    assert rendered.problem


# --- Where links lead ------------------------------------------------------------------


@pytest.mark.parametrize("markup,expected", [
    ('<a href="https://evil.example/x">Click here</a>', "Click here <https://evil.example/x>"),
    ("<A HREF='http://evil.example/'>Bank</A> now", "Bank <http://evil.example/> now"),
    ("<a class=x href=https://evil.example/u?a=1&amp;b=2>pay</a>",
     "pay <https://evil.example/u?a=1&b=2>"),
    ('<a href="mailto:boss@evil.example">the boss</a>', "the boss <mailto:boss@evil.example>"),
    ('<a href=" https://evil.example/ ">x</a>', "x <https://evil.example/>"),
    ('<a href="https://evil.example/a b<c>">x</a>', "x <https://evil.example/a%20b%3Cc%3E>"),
    ('<a href="https://evil.example/"><img src="logo.png"></a>', "<https://evil.example/>"),
])
def test_a_links_target_is_shown_after_its_text(markup, expected):
    assert html_to_text(markup) == expected


@pytest.mark.parametrize("markup,expected", [
    ('<a href="https://example.com/">https://example.com/</a>', "https://example.com/"),
    ('<a href="https://example.com/">https://example.com</a>', "https://example.com"),
    ('<a href="mailto:a@example.com">a@example.com</a>', "a@example.com"),
    ('<a href="javascript:alert(1)">Click</a>', "Click"),
    ('<a href="data:text/html,x">Click</a>', "Click"),
    ('<a href="/relative/path">Click</a>', "Click"),
    ('<a href="cid:part1">Click</a>', "Click"),
    ('<a name="top">Top</a>', "Top"),
    ('<a href="java\tscript:alert(1)">Click</a>', "Click"),
])
def test_targets_that_are_the_text_or_not_web_addresses_are_not_repeated(markup, expected):
    assert html_to_text(markup) == expected


def test_controls_and_bidi_overrides_are_removed_from_a_target():
    text = html_to_text('<a href="https://evil.exa\x00mple/\u202egpj.exe\x1b[31m">x</a>')

    assert text == "x <https://evil.example/gpj.exe[31m>"


def test_a_long_target_is_cut():
    text = html_to_text(f'<a href="https://evil.example/{"a" * 5000}">x</a>')

    target = text[len("x <"):-1]
    assert text.startswith("x <https://evil.example/aaa") and text.endswith("…>")
    assert len(target) <= 300


def test_a_link_left_open_is_closed_by_the_next_one_and_by_the_end():
    text = html_to_text('<a href="https://one.example/">one <a href="https://two.example/">two')

    assert text == "one <https://one.example/>two <https://two.example/>"


def test_a_links_target_reaches_the_rendered_body_as_text():
    raw = mail(html='<p><a href="https://evil.example/login">Log in to your bank</a></p>')

    rendered = render_message(raw)

    assert rendered.body == "Log in to your bank <https://evil.example/login>"


@pytest.mark.parametrize("unit", ['<a href="', "<a href=", '<a href="https://e.example/">x',
                                  '<a href="https://e.example/" href="', "<a href href href "])
def test_links_are_converted_in_bounded_time(unit):
    markup = unit * 100_000
    started = time.monotonic()

    text = html_to_text(markup)

    assert time.monotonic() - started < 2
    assert len(text) <= MAX_BODY_CHARS
