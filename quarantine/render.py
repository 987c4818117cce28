"""The safe plain-text view of a quarantined message.

Nothing of the mail's own markup reaches a browser: text parts are decoded to `str`, an
HTML-only message is converted to readable text, and the page prints the result with
autoescaping inside `<pre>`. Attachments are listed (names, type, size), never opened.

All work is bounded: the parts walked, the bytes decoded and the characters produced are
capped, and the HTML converter is a single forward pass. The standard library's
`html.parser` is not used on mail data: on Python 3.11 it takes quadratic time on inputs
such as `<a <a <a ...` and raises AssertionError on `<![<![`.
"""

from __future__ import annotations

import codecs
import email
import html
import re
from dataclasses import dataclass, field
from email import policy
from email.message import Message as EmailMessage
from email.utils import collapse_rfc2231_value

from quarantine.headers import (
    display_value,
    format_addresses,
    make_visible,
    replace_surrogates,
)

MAX_BODY_CHARS = 200_000
MAX_PARTS = 500
MAX_DEPTH = 20
# Bytes of one part decoded into text: enough for MAX_BODY_CHARS in any charset.
MAX_PART_BYTES = MAX_BODY_CHARS * 4
# HTML fed to the converter; markup is mostly tags, so it allows more than the output.
MAX_HTML_CHARS = 4 * MAX_BODY_CHARS

SHOWN_HEADERS = ("From", "To", "Cc", "Subject", "Date")
_ADDRESS_HEADERS = {"from", "to", "cc"}

# Controls, bidi overrides and lone surrogates in a body: made visible like in headers, but
# line breaks and tabs are the text's own layout and stay.
_BODY_CONTROL_RE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff"
    "\ud800-\udfff]"
)


@dataclass
class Attachment:
    names: list[str]
    content_type: str
    size: int

    @property
    def name(self) -> str:
        return " / ".join(self.names) if self.names else "(no name)"


@dataclass
class RenderedMessage:
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: str = ""
    truncated: bool = False
    from_html: bool = False
    attachments: list[Attachment] = field(default_factory=list)
    problem: str = ""


def render_message(raw: bytes, *, max_chars: int = MAX_BODY_CHARS) -> RenderedMessage:
    """Headers, body text and attachment list of `raw` (the original message bytes)."""
    try:
        # compat32 keeps header values as the raw strings; decoding is ours (headers.py).
        msg = email.message_from_bytes(raw, policy=policy.compat32)
    except Exception:  # noqa: BLE001 - a hostile message must still give a page
        return RenderedMessage(problem="The message cannot be parsed.")
    out = RenderedMessage(headers=_shown_headers(msg))
    plain: list[str] = []
    htmls: list[str] = []
    try:
        _walk(msg, out, plain, htmls, depth=0, counter=[0])
    except RecursionError:
        out.problem = "The message is nested too deeply to be shown completely."
    if plain:
        text = "\n\n".join(plain)
    elif htmls:
        text = html_to_text("\n".join(htmls), max_chars=max_chars + 1)
        out.from_html = True
    else:
        text = ""
    if len(text) > max_chars:
        text = text[:max_chars]
        out.truncated = True
    out.body = _visible_body(text)
    return out


def _shown_headers(msg: EmailMessage) -> list[tuple[str, str]]:
    out = []
    for name in SHOWN_HEADERS:
        values = [_raw_header(v) for k, v in msg.raw_items() if k.lower() == name.lower()]
        for value in values[:5]:
            if name.lower() in _ADDRESS_HEADERS:
                out.append((name, format_addresses(value)))
            else:
                out.append((name, display_value(value)))
    return out


def _raw_header(value: object) -> bytes:
    # Undecodable 8-bit header bytes arrive as surrogate escapes; hand the bytes on so
    # that they are decoded (UTF-8, else latin-1) rather than reaching a template. A
    # surrogate that is no such escape cannot be turned into a byte and becomes U+FFFD.
    text = str(value)
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return replace_surrogates(text).encode("utf-8")


def _walk(
    part: EmailMessage,
    out: RenderedMessage,
    plain: list[str],
    htmls: list[str],
    *,
    depth: int,
    counter: list[int],
) -> None:
    counter[0] += 1
    if counter[0] > MAX_PARTS or depth > MAX_DEPTH:
        out.problem = "The message has too many parts; only the first ones are shown."
        return
    content_type = _content_type(part)
    if part.is_multipart() and content_type.startswith("multipart/"):
        payload = part.get_payload()
        for child in payload if isinstance(payload, list) else []:
            if isinstance(child, EmailMessage):
                _walk(child, out, plain, htmls, depth=depth + 1, counter=counter)
        return
    names = attachment_names(part)
    # str(): compat32 gives a Header object, not a str, for a field with 8-bit bytes.
    disposition = str(part.get("Content-Disposition") or "").split(";", 1)[0].strip().lower()
    is_body = (
        not names
        and disposition != "attachment"
        and content_type in ("text/plain", "text/html", "text")
    )
    if is_body:
        text = _decode_text(part)
        (htmls if content_type == "text/html" else plain).append(text)
        return
    # Everything else (files, attached messages, images) is listed and never opened.
    out.attachments.append(
        Attachment(names=names, content_type=display_value(content_type, limit=200),
                   size=_decoded_size(part))
    )


def _content_type(part: EmailMessage) -> str:
    try:
        return part.get_content_type()
    except Exception:  # noqa: BLE001
        return "application/octet-stream"


def attachment_names(part: EmailMessage) -> list[str]:
    """Every file name a part carries, decoded and made visible, without duplicates.

    Mail clients disagree on which of `filename`, `filename*` and the Content-Type `name`
    wins, so a person is shown all of them."""
    names: list[str] = []
    for header, key in (("content-disposition", "filename"), ("content-type", "name")):
        try:
            params = part.get_params(header=header) or []
        except Exception:  # noqa: BLE001 - a header that cannot be split has no names
            params = []
        for pname, pvalue in params[1:]:
            if pname.lower() != key:
                continue
            if isinstance(pvalue, tuple):
                value = _rfc2231_text(pvalue)
            else:
                value = pvalue
            shown = display_value(_raw_header(value), limit=300)
            if shown and shown not in names:
                names.append(shown)
    return names


def _rfc2231_text(value: tuple) -> str:
    """An RFC 2231 parameter value decoded in the charset it names; in UTF-8 where it names
    none or one that no codec lookup accepts."""
    try:
        text = collapse_rfc2231_value(value, errors="replace", fallback_charset="utf-8")
    except ValueError:  # a charset name with a NUL in it
        text = collapse_rfc2231_value(
            (None, None, str(value[-1])), errors="replace", fallback_charset="utf-8"
        )
    return replace_surrogates(text)


def _payload_bytes(part: EmailMessage) -> bytes:
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001
        return b""
    return payload if isinstance(payload, bytes) else b""


def _decoded_size(part: EmailMessage) -> int:
    if part.is_multipart():
        # An attached message: its size as stored.
        return len(str(part.get_payload()))
    return len(_payload_bytes(part))


def _decode_text(part: EmailMessage) -> str:
    payload = _payload_bytes(part)[:MAX_PART_BYTES]
    charset = part.get_content_charset() or "us-ascii"
    try:
        codecs.lookup(charset)
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        charset = "utf-8"
    try:
        text = payload.decode(charset, "replace")
    except Exception:  # noqa: BLE001 - some codecs raise their own errors on bad input
        text = payload.decode("utf-8", "replace")
    return replace_surrogates(text).replace("\r\n", "\n").replace("\r", "\n")


def _visible_body(text: str) -> str:
    return _BODY_CONTROL_RE.sub(lambda m: make_visible(m.group(0)), text)


# --- HTML to text ---------------------------------------------------------------------

# Elements whose content is never text for a reader.
_SKIP_CONTENT = frozenset(
    {"script", "style", "title", "head", "template", "noscript", "svg", "math", "iframe",
     "object", "textarea", "xmp", "noembed", "noframes", "select"}
)
_BLOCK = frozenset(
    {"address", "article", "aside", "blockquote", "br", "center", "dd", "div", "dl", "dt",
     "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
     "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "tbody",
     "thead", "tfoot", "tr", "ul", "body", "html", "caption"}
)
_CELL = frozenset({"td", "th"})
_TAG_NAME_RE = re.compile(r"\s*(/?)\s*([A-Za-z][A-Za-z0-9:-]{0,40})")
_WS_RE = re.compile(r"[ \t\r\n\f]+")
_END_TAG_RE_CACHE: dict[str, re.Pattern[str]] = {}


def _end_tag_re(name: str) -> re.Pattern[str]:
    if name not in _END_TAG_RE_CACHE:
        _END_TAG_RE_CACHE[name] = re.compile(rf"</\s*{re.escape(name)}\b", re.IGNORECASE)
    return _END_TAG_RE_CACHE[name]


def html_to_text(markup: str, *, max_chars: int = MAX_BODY_CHARS) -> str:
    """Readable text of an HTML document, in time linear in its length.

    One forward pass: each `<` starts a tag only where a `>` follows; otherwise the rest of
    the input is dropped (as a browser drops an unterminated tag), so no position is
    scanned twice. Content of script, style, head, title and similar elements is dropped;
    block elements become line breaks; entities are decoded. No markup is kept."""
    markup = markup[:MAX_HTML_CHARS]
    pieces: list[str] = []
    produced = 0
    pre_depth = 0
    pos = 0
    length = len(markup)
    while pos < length and produced <= max_chars:
        lt = markup.find("<", pos)
        if lt < 0:
            lt = length
        if lt > pos:
            text = html.unescape(markup[pos:lt])
            if not pre_depth:
                text = _WS_RE.sub(" ", text)
            pieces.append(text)
            produced += len(text)
        if lt >= length:
            break
        if markup.startswith("<!--", lt):
            end = markup.find("-->", lt + 4)
            pos = length if end < 0 else end + 3
            continue
        nxt = markup[lt + 1 : lt + 2]
        if nxt in ("!", "?"):
            # Doctype, CDATA and processing instructions: never text.
            end = markup.find(">", lt)
            pos = length if end < 0 else end + 1
            continue
        match = _TAG_NAME_RE.match(markup, lt + 1)
        if not match:
            pieces.append("<")
            produced += 1
            pos = lt + 1
            continue
        end = markup.find(">", match.end())
        if end < 0:
            break
        closing, name = match.group(1) == "/", match.group(2).lower()
        pos = end + 1
        if not closing and name in _SKIP_CONTENT and not markup[end - 1 : end] == "/":
            close = _end_tag_re(name).search(markup, pos)
            gt = -1 if close is None else markup.find(">", close.end())
            pos = length if gt < 0 else gt + 1
            if name == "head":
                pieces.append("\n")
            continue
        if name == "pre":
            pre_depth = max(0, pre_depth + (-1 if closing else 1))
        if name == "li":
            if not closing:
                pieces.append("\n- ")
        elif name in _BLOCK:
            pieces.append("\n\n" if name in ("p", "h1", "h2", "h3", "h4", "h5", "h6") else "\n")
        elif name in _CELL and not closing:
            pieces.append("\t")
    return _tidy("".join(pieces))[:max_chars]


def _tidy(text: str) -> str:
    lines = [line.strip(" \t") for line in text.split("\n")]
    out: list[str] = []
    blank = 0
    for line in lines:
        if not line:
            blank += 1
            if blank > 1:
                continue
        else:
            blank = 0
        out.append(line)
    return "\n".join(out).strip("\n")


# --- Index columns --------------------------------------------------------------------


@dataclass
class Summary:
    """The indexed columns of a message as they are shown in the list and on the detail."""

    subject: str
    from_: str
    to: str
    sender: str
    reasons: str


def summarize(message) -> Summary:
    """Index values made visible again, never re-parsed.

    The indexer stores headers decoded already; parsing them a second time would read a
    display name such as `"<x>" <a@b>` as addresses and mangle it. Making controls visible
    once more is idempotent and keeps rows written by any indexer, an older one included,
    from carrying controls to a page unnoticed (markup is escaped by the templates)."""
    reasons = "; ".join(
        _cut(make_visible(line.strip()), 500)
        for line in message.reasons.splitlines()
        if line.strip()
    )
    return Summary(
        subject=_cut(make_visible(message.subject), 300) or "(no subject)",
        from_=_cut(make_visible(message.from_header), 300),
        to=_cut(make_visible(message.to_header), 300),
        sender=make_visible(message.envelope_sender)[:320] or "<>",
        reasons=_cut(reasons, 2000),
    )


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
