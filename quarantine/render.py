"""The safe plain-text view of a quarantined message.

Nothing of the mail's own markup reaches a browser: text parts are decoded to `str`, an
HTML part that has no plain-text alternative is converted to readable text, and the page
prints the result with autoescaping inside `<pre>`. Attachments are listed (names, type,
size), never opened.

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

import webencodings

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
    pieces: list[_Piece] = []
    try:
        _walk(msg, out, pieces, depth=0, counter=[0])
    except RecursionError:
        out.problem = "The message is nested too deeply to be shown completely."
    texts: list[str] = []
    budget = max_chars + 1
    for piece in pieces:
        if budget <= 0:
            break
        text = piece.text
        if piece.html:
            text = html_to_text(text, max_chars=budget)
            out.from_html = True
        texts.append(text)
        budget -= len(text) + 2
    text = "\n\n".join(texts)
    if len(text) > max_chars:
        text = text[:max_chars]
        out.truncated = True
    out.body = _visible_body(text)
    return out


@dataclass
class _Piece:
    """One body part's decoded text, in the order of the message; HTML still as markup."""

    text: str
    html: bool = False

    @property
    def blank(self) -> bool:
        return not self.text.strip()


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
    pieces: list[_Piece],
    *,
    depth: int,
    counter: list[int],
) -> None:
    """Append the body parts below `part` to `pieces` in reading order and list the rest.

    Every part of a multipart/mixed (or related, or any other kind) is read in turn: an
    HTML body followed by a plain-text footer is both. Of a multipart/alternative only one
    child is read: the first with plain text in it, else the last (the richest) that has
    any text; the attachments of every child are listed."""
    counter[0] += 1
    if counter[0] > MAX_PARTS or depth > MAX_DEPTH:
        out.problem = "The message has too many parts; only the first ones are shown."
        return
    content_type = _content_type(part)
    if part.is_multipart() and content_type.startswith("multipart/"):
        payload = part.get_payload()
        children = [c for c in (payload if isinstance(payload, list) else [])
                    if isinstance(c, EmailMessage)]
        if content_type != "multipart/alternative":
            for child in children:
                _walk(child, out, pieces, depth=depth + 1, counter=counter)
            return
        alternatives: list[list[_Piece]] = []
        for child in children:
            alternatives.append([])
            _walk(child, out, alternatives[-1], depth=depth + 1, counter=counter)
        pieces.extend(_pick_alternative(alternatives))
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
        pieces.append(_Piece(_decode_text(part), html=content_type == "text/html"))
        return
    # Everything else (files, attached messages, images) is listed and never opened.
    out.attachments.append(
        Attachment(names=names, content_type=display_value(content_type, limit=200),
                   size=_decoded_size(part))
    )


def _pick_alternative(alternatives: list[list[_Piece]]) -> list[_Piece]:
    """The alternative to show: plain text where there is some (an empty text/plain beside
    the HTML, as some bulk mailers send, does not count), else the last one with text."""
    for pieces in alternatives:
        if any(not p.html and not p.blank for p in pieces):
            return pieces
    for pieces in reversed(alternatives):
        if any(not p.blank for p in pieces):
            return pieces
    return alternatives[0] if alternatives else []


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
        # An attached message (message/rfc822 and the like): the size of that message.
        payload = part.get_payload()
        inner = payload[0] if isinstance(payload, list) and payload else None
        if not isinstance(inner, EmailMessage):
            return 0
        try:
            return len(inner.as_bytes())
        except Exception:  # noqa: BLE001 - a hostile message must still give a page
            return 0
    return len(_payload_bytes(part))


def _decode_text(part: EmailMessage) -> str:
    payload = _payload_bytes(part)[:MAX_PART_BYTES]
    text = decode_text(payload, part.get_content_charset())
    text = replace_surrogates(text).replace("\r\n", "\n").replace("\r", "\n")
    if part.get_content_type() == "text/plain" and _param(part, "format") == "flowed":
        text = unflow(text, delsp=_param(part, "delsp") == "yes")
    return text


def _param(part: EmailMessage, name: str) -> str:
    try:
        value = part.get_param(name)
    except Exception:  # noqa: BLE001 - a Content-Type that cannot be split has none
        return ""
    if isinstance(value, tuple):
        value = value[-1]
    return str(value or "").strip().lower()


def _codec_for(label: str | None) -> str | None:
    """The codec to decode text labelled `label` with; None when no codec is known.

    A label is read as mail clients and browsers read it (the WHATWG Encoding Standard,
    through webencodings): ISO-8859-1 text with Windows-1252 quotes and euro signs is
    Windows-1252, GB2312 text with GBK characters is GBK, `iso-8859-8-i` and
    `x-mac-roman` are known. Labels the standard leaves out (UTF-7, the DOS code pages)
    are looked up in Python's codecs. ASCII stays ASCII: `decode_text` reads 8-bit text
    labelled so as undeclared."""
    label = (label or "").strip()
    try:
        if codecs.lookup(label).name == "ascii":
            return "ascii"
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        pass
    encoding = webencodings.lookup(label)
    if encoding is not None:
        return encoding.codec_info.name
    try:
        return codecs.lookup(label).name
    except (LookupError, ValueError):
        return None


def decode_text(payload: bytes, label: str | None) -> str:
    """Text of a body part from its bytes and its charset label, never an error.

    Plain ASCII is the default (RFC 2045) but mail often sends 8-bit text without a label,
    or labelled US-ASCII: it is read as UTF-8 where it is valid UTF-8, else as Windows-1252.
    So is text in a charset no codec is known for. A known charset is decoded with U+FFFD
    for the bytes it does not have."""
    codec = _codec_for(label or "us-ascii")
    if codec in (None, "ascii"):
        if payload.isascii():
            return payload.decode("ascii")
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            return payload.decode("cp1252", "replace")
    try:
        return payload.decode(codec, "replace")
    except Exception:  # noqa: BLE001 - some codecs raise their own errors on bad input
        return payload.decode("utf-8", "replace")


def unflow(text: str, *, delsp: bool = False) -> str:
    """Plain text of a format=flowed part (RFC 3676), in one pass over its lines.

    A line ending in a space goes on in the next line of the same quote depth; the space
    that was put before a line for transport (space-stuffing) goes; with DelSp=yes the
    space at the join goes too. "-- " (a signature separator) ends a paragraph."""
    out: list[str] = []
    current: list[str] = []
    current_depth = -1
    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:]
        if content.startswith(" "):
            content = content[1:]
        flowed = content.endswith(" ") and content != "-- "
        if current and depth != current_depth:
            out.append(_quoted("".join(current), current_depth))
            current = []
        if flowed and delsp:
            content = content[:-1]
        current.append(content)
        current_depth = depth
        if not flowed:
            out.append(_quoted("".join(current), depth))
            current = []
    if current:
        out.append(_quoted("".join(current), current_depth))
    return "\n".join(out)


def _quoted(text: str, depth: int) -> str:
    return f"{'>' * depth} {text}" if depth else text


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
# The attributes of a start tag, one at a time: a name, then maybe `=` and a value (quoted
# values are found with str.find, so that each character is looked at once).
_ATTR_NAME_RE = re.compile(r"[\s/]*([^\s/>=][^\s/>=]*)?\s*(=?)\s*")
_UNQUOTED_VALUE_RE = re.compile(r"[^\s>]*")
# A link's target is shown for these schemes only: where a click in a mail client leads.
_SHOWN_SCHEMES = ("http:", "https:", "mailto:")
MAX_TARGET_CHARS = 300
# Removed from a shown target: controls, bidi and other invisible format characters, which
# could make the target read as another one. Browsers drop tabs and line breaks from a URL.
_TARGET_REMOVED_RE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2069"
    "\ufeff\ufff9-\ufffb\ud800-\udfff]"
)
# Characters that would make a shown target ambiguous (end it, or run it into the text).
_TARGET_QUOTED = {" ": "%20", "<": "%3C", ">": "%3E", '"': "%22"}
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
    block elements become line breaks; entities are decoded. No markup is kept.

    Where a link leads is the first thing to check in a phishing mail, so a link's
    web or mail target follows its text as `text <target>` (plain text, never a link),
    unless the text says the same."""
    markup = markup[:MAX_HTML_CHARS]
    pieces: list[str] = []
    produced = 0
    pre_depth = 0
    pos = 0
    length = len(markup)
    # The open link: its shown target and where its text starts in `pieces`.
    link: tuple[str, int] | None = None

    def close_link() -> int:
        nonlocal link
        if link is None:
            return 0
        target, start = link
        link = None
        label = _WS_RE.sub(" ", "".join(pieces[start:])).strip()
        if not target or _same_target(label, target):
            return 0
        shown = f"<{target}>" if not label or pieces[-1][-1:].isspace() else f" <{target}>"
        pieces.append(shown)
        return len(shown)

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
        closing, name = match.group(1) == "/", match.group(2).lower()
        if name == "a" and not closing:
            # Quoted values may hold a `>`: the attributes are read to find the tag's end.
            href, end = _link_attributes(markup, match.end())
        else:
            href, end = None, markup.find(">", match.end())
        if end < 0:
            break
        pos = end + 1
        if name == "a":
            # A link inside a link ends the first one, as in a browser.
            produced += close_link()
            if not closing:
                link = (_shown_target(href), len(pieces))
            continue
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
    close_link()
    return _tidy("".join(pieces))[:max_chars]


def _link_attributes(markup: str, pos: int) -> tuple[str | None, int]:
    """The `href` of the start tag whose attributes begin at `pos`, and the position of the
    `>` that ends the tag (-1: the tag never ends). Each character is read once."""
    href = None
    length = len(markup)
    while pos < length:
        match = _ATTR_NAME_RE.match(markup, pos)
        pos = match.end()
        if pos >= length:
            break
        if markup[pos] == ">" and not match.group(2):
            return href, pos
        name = (match.group(1) or "").lower()
        if not match.group(2):
            if not match.group(1):
                pos += 1  # a character no attribute starts with
            continue
        quote = markup[pos]
        if quote in "\"'":
            close = markup.find(quote, pos + 1)
            if close < 0:
                return href, -1
            value, pos = markup[pos + 1 : close], close + 1
        else:
            value_match = _UNQUOTED_VALUE_RE.match(markup, pos)
            value, pos = value_match.group(0), value_match.end()
        if name == "href" and href is None:
            href = value
    return href, -1


def _shown_target(href: str | None) -> str:
    """A link's target as it is shown beside its text: web and mail addresses only, with
    the characters that could disguise it removed, cut to MAX_TARGET_CHARS; "" for none."""
    if not href:
        return ""
    target = _TARGET_REMOVED_RE.sub("", html.unescape(href[: 4 * MAX_TARGET_CHARS])).strip()
    if not target.lower().startswith(_SHOWN_SCHEMES):
        return ""
    target = "".join(_TARGET_QUOTED.get(char, char) for char in target)
    if len(target) > MAX_TARGET_CHARS:
        target = target[: MAX_TARGET_CHARS - 1] + "…"
    return target


def _same_target(label: str, target: str) -> bool:
    """Whether a link's text already says where it leads."""
    if target.lower().startswith("mailto:"):
        target = target[len("mailto:") :]
    return label.rstrip("/") == target.rstrip("/")


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
