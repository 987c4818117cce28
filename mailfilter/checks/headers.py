"""Bad headers and bad MIME: one BADH finding per kind of defect the parser recorded.

The finding's name is the defect's name (`8bit-in-header`, `duplicate-boundary`,
`invalid-base64-characters`...), so statistics can count each class, as amavis counts its
bad-header categories; the detail says where the first one was and how many there were.

`utf8_headers`: the message came with SMTPUTF8, under which RFC 6532 allows UTF-8 in
header fields (`From: Jürgen <jürgen@bücher.example>`). Such a message's 8-bit header
bytes are no defect when the whole header section is valid UTF-8; other 8-bit bytes
(Latin-1 written raw, say) still are.
"""

from __future__ import annotations

import re

from mailfilter.findings import Finding
from mailfilter.mime import ParsedMessage

# The end of the message's own header section: its first empty line.
_END_OF_HEADER = re.compile(rb"(?:\A|\n)\r?\n")


def _utf8_header_section(raw: bytes) -> bool:
    end = _END_OF_HEADER.search(raw)
    section = raw[: end.start()] if end is not None else raw
    try:
        section.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_headers(parsed: ParsedMessage, *, utf8_headers: bool = False) -> list[Finding]:
    first: dict[str, str] = {}
    counts: dict[str, int] = {}
    allowed_8bit = utf8_headers and _utf8_header_section(parsed.raw)
    for defect in parsed.defects:
        if allowed_8bit and defect.name == "8bit-in-header":
            continue
        first.setdefault(defect.name, defect.detail)
        counts[defect.name] = counts.get(defect.name, 0) + 1
    findings = []
    for name, detail in first.items():
        more = f" (and {counts[name] - 1} more)" if counts[name] > 1 else ""
        findings.append(Finding("BADH", name, 0.0, f"{detail}{more}"))
    return findings
