"""Decoding header values of hostile mail into text that is safe to store and show.

Every function here returns plain `str` and never raises on bad input: encoded words in
any charset (unknown ones fall back to latin-1), raw 8-bit bytes (UTF-8, else latin-1),
broken encodings replaced. Lone surrogates (U+D800..U+DFFF), which some charsets (UTF-7,
unicode_escape) produce from hostile bytes and which neither a UTF-8 page nor PostgreSQL
can carry, become U+FFFD. Control characters, line breaks and bidirectional overrides are
made visible (`\\r`, `<U+202E>`) so that a decoded Subject can never start a new header
line or reorder what a person reads.
"""

from __future__ import annotations

import codecs
import re
from email.header import decode_header
from email.utils import getaddresses, parseaddr

# Input beyond these sizes is cut before parsing: header parsing in the standard library is
# superlinear on some crafted inputs.
MAX_HEADER_CHARS = 8192
MAX_ADDRESSES = 200

_ENCODED_WORD_RE = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
# Lone surrogates are listed too: text that reaches a page without passing through
# replace_surrogates still cannot carry one there.
_CONTROL_RE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff"
    "\ud800-\udfff\r\n\t]"
)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """`text` with each lone surrogate (U+D800..U+DFFF) replaced by U+FFFD.

    Codecs such as UTF-7, unicode_escape and raw_unicode_escape decode crafted bytes to
    lone surrogates, even with errors="replace"; such a `str` cannot be encoded as UTF-8.
    ASCII text is returned at once, other text after one UTF-8 encode in C; only text that
    holds a surrogate is searched."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE_RE.sub("\ufffd", text)
    return text


def make_visible(text: str) -> str:
    """Control, line-break, bidi and lone surrogate characters as visible escapes; tabs as
    spaces."""

    def repl(match: re.Match[str]) -> str:
        ch = match.group(0)
        if ch == "\t":
            return " "
        if ch == "\r":
            return "\\r"
        if ch == "\n":
            return "\\n"
        return f"<U+{ord(ch):04X}>"

    return _CONTROL_RE.sub(repl, text)


def _decode_bytes(raw: bytes, charset: str | None) -> str:
    if charset:
        charset = charset.split("*", 1)[0].strip().lower()  # RFC 2231 language suffix
        try:
            codecs.lookup(charset)
        except (LookupError, ValueError):  # ValueError: a NUL in the name
            charset = None
    if charset and charset not in ("unknown-8bit", "x-unknown"):
        try:
            return replace_surrogates(raw.decode(charset, "replace"))
        except (LookupError, ValueError):
            pass
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def decode_value(value: str | bytes | None) -> str:
    """A header value (raw bytes or str) with encoded words decoded; never raises."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = _decode_bytes(value, None)
    value = str(value)[:MAX_HEADER_CHARS]
    # Unfold: a continuation line is part of the value.
    value = re.sub(r"\r?\n[ \t]", " ", value)
    if "=?" not in value:
        return value
    try:
        parts = decode_header(value)
    except Exception:  # noqa: BLE001 - hostile input must never stop indexing or a page
        return value
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, bytes):
            out.append(_decode_bytes(chunk, charset))
        else:
            out.append(chunk)
    return "".join(out)


def display_value(value: str | bytes | None, *, limit: int = 1000) -> str:
    """Decoded, controls made visible, cut to `limit` characters: for storage and pages."""
    text = make_visible(decode_value(value)).strip()
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def decode_addresses(value: str | bytes | None) -> list[tuple[str, str]]:
    """(display name, address) pairs of an address header, names decoded and made visible.

    A Mailsploit-style name carrying an address, NUL or line break cannot hide the real
    address: both are returned, the name with its controls escaped."""
    # Raw 8-bit names decode as elsewhere here (UTF-8, else latin-1), not to U+FFFD.
    text = _decode_bytes(value, None) if isinstance(value, bytes) else (value or "")
    text = text[:MAX_HEADER_CHARS]
    try:
        pairs = getaddresses([text])[:MAX_ADDRESSES]
    except Exception:  # noqa: BLE001
        pairs = [parseaddr(text)]
    out = []
    for name, addr in pairs:
        if not name and not addr:
            continue
        out.append((display_value(name, limit=300), make_visible(decode_value(addr))[:320]))
    return out


def format_addresses(value: str | bytes | None, *, limit: int = 1000) -> str:
    """`Name <addr>, ...` with each name decoded and made visible."""
    pairs = decode_addresses(value)
    if not pairs:
        return display_value(value, limit=limit)
    text = ", ".join(f"{name} <{addr}>" if name else addr for name, addr in pairs)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def has_encoded_words(value: str) -> bool:
    return bool(_ENCODED_WORD_RE.search(value))
