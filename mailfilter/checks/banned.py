"""Banned attachments: MessageWall's filename_reject and mime_reject, plus built-in rules.

Profile rules (`filename_reject`, `mime_reject`) are given as `(score, value)` pairs or
plain values (score 1). `filename_reject` is searched for, case-insensitively, in every
name variant of every part (MessageWall: "searched for in any filenames"); `mime_reject`
is compared with the declared type, the type Python settles on, and the type sniffed from
the content, so that an executable declared `image/jpeg` is caught by
`mime_reject=application/x-dosexec` as well as by the built-in executable rule.

Built-in rules (on unless `builtin=False`), for names after Unicode NFKC folding with
format characters removed and trailing dots and spaces stripped (Windows drops those):
executable extensions, double extensions (`invoice.pdf.exe`, the amavis rule), CLSID
extensions, bidi and control characters in a name, executable content, a macro-enabled
Office document under a macro-free name, and `message/partial` (a fragment cannot be
scanned, and reassembled fragments would bypass every check).

`invoice.e%78e` is left as written: percent signs are not decoded, because no mail client
decodes them in a file name and the name is not executable as saved.

Archives (zip, gzip, bzip2, xz, tar, nested) are listed and their members judged by the
same rules unless `allow_banned_in_archives`. Archives that could not be looked into
(bombs, encrypted members, corrupt data, rar/7z) and messages whose structure could not be
fully parsed are banned whatever that setting, with the reason as the detail.

TNEF (`application/ms-tnef`, winmail.dat) is not decoded: it is reported as an
undecipherable container, so it is quarantined rather than passed unseen. uuencoded and
yEnc files inside text parts are decoded by the parser and their names and content judged
like attachments; an embedded archive is listed and its members judged like a part's.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

from mailfilter import sniff
from mailfilter.archives import ArchiveListing
from mailfilter.findings import Finding
from mailfilter.mime import ParsedMessage, Part

Rule = str | tuple[float, str]

EXECUTABLE_EXTENSIONS = frozenset(
    """
    exe com pif scr bat cmd cpl dll msi msp mst vbs vbe js jse wsf wsh wsc hta lnk reg scf
    inf shb shs sct ps1 psm1 jar msc chm application gadget cab ade adp bas crt hlp ins isp
    url vb ws
    """.split()
)
_DOUBLE_EXTENSION = re.compile(
    r"\.[^./]*[a-z][^./]*\.\s*(exe|vbs|pif|scr|bat|cmd|com|cpl|dll)[.\s]*$", re.IGNORECASE
)
_CLSID = re.compile(
    r"\{[0-9a-f]{8}(-|%2d)?[0-9a-f]{4}(-|%2d)?[0-9a-f]{4}(-|%2d)?[0-9a-f]{4}(-|%2d)?"
    r"[0-9a-f]{12}\}?",
    re.IGNORECASE,
)
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_MACRO_FREE = (".docx", ".xlsx", ".pptx", ".dotx", ".xltx", ".potx")
_MACRO_MEMBERS = ("word/vbaproject.bin", "xl/vbaproject.bin", "ppt/vbaproject.bin")
_TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})


def check_banned(
    parsed: ParsedMessage,
    *,
    filename_reject: Iterable[Rule] = (),
    mime_reject: Iterable[Rule] = (),
    allow_banned_in_archives: bool = False,
    builtin: bool = True,
) -> list[Finding]:
    names = _rules(tuple(filename_reject))
    types = _rules(tuple(mime_reject))
    findings: list[Finding] = []
    for defect in parsed.unscannable:
        findings.append(Finding("BANNED", "unscannable", 0.0, f"{defect.name}: {defect.detail}"))
    for part in parsed.parts:
        where = part.label
        for name in part.filenames:
            findings.extend(_judge_name(name, where, names, builtin))
        for embedded in part.embedded:
            inside = f"{where} ({embedded.encoding})"
            findings.extend(_judge_name(embedded.name, inside, names, builtin))
            findings.extend(_judge_type((embedded.sniffed,), inside, types, builtin))
            findings.extend(
                _judge_listing(
                    parsed.listing(embedded), inside, names, types, builtin,
                    allow_banned_in_archives,
                )
            )
        declared = (part.declared_type, part.content_type, part.sniffed)
        findings.extend(_judge_type(declared, where, types, builtin))
        if builtin:
            findings.extend(_builtin_part_rules(parsed, part))
        findings.extend(
            _judge_listing(
                parsed.listing(part), where, names, types, builtin, allow_banned_in_archives
            )
        )
    return _unique(findings)


def _judge_listing(
    listing: ArchiveListing | None,
    where: str,
    names: tuple[tuple[float, str], ...],
    types: tuple[tuple[float, str], ...],
    builtin: bool,
    allow_banned_in_archives: bool,
) -> list[Finding]:
    """An archive's problems (always) and its members' names and types (unless allowed)."""
    if listing is None:
        return []
    findings = [
        Finding("BANNED", f"archive-{problem.kind}", 0.0, problem.reason)
        for problem in listing.problems
    ]
    if allow_banned_in_archives:
        return findings
    for member in listing.members:
        inside = f"{where}: {'/'.join(member.chain)}"
        findings.extend(_judge_name(member.name, inside, names, builtin))
        findings.extend(_judge_type((member.sniffed,), f"{where}: {member.path}", types, builtin))
    return findings


# A profile hands over the same tuples of rules for every message: converting them once
# saves much of the check's time on mail without attachments.
@functools.lru_cache(maxsize=256)
def _rules(rules: tuple[Rule, ...]) -> tuple[tuple[float, str], ...]:
    out: list[tuple[float, str]] = []
    for rule in rules:
        score, value = (1.0, rule) if isinstance(rule, str) else rule
        if value.strip():
            out.append((float(score), value.strip().lower()))
    return tuple(out)


def show(name: str) -> str:
    """A name fit for a log line or a reason: controls and bidi marks as escapes."""
    return "".join(
        f"\\u{ord(ch):04x}" if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in name
    )


def normalise_name(name: str) -> str:
    """The name as a file system would end up with it, for the built-in rules."""
    folded = unicodedata.normalize("NFKC", name)
    folded = "".join(ch for ch in folded if unicodedata.category(ch) not in ("Cf", "Cc"))
    return folded.rstrip(". \t").lower()


def _judge_name(
    name: str, where: str, rules: tuple[tuple[float, str], ...], builtin: bool
) -> list[Finding]:
    findings: list[Finding] = []
    lowered = name.lower()
    normalised = normalise_name(name)
    for score, value in rules:
        if value in lowered or value in normalised:
            findings.append(
                Finding("BANNED", "filename-reject", score, f"{where}: {show(name)} ({value})")
            )
    if not builtin:
        return findings
    if any(ch in _BIDI or unicodedata.category(ch) == "Cc" for ch in name):
        findings.append(
            Finding("BANNED", "control-character-in-name", 0.0, f"{where}: {show(name)}")
        )
    extension = normalised.rpartition(".")[2].strip() if "." in normalised else ""
    if _DOUBLE_EXTENSION.search(normalised):
        findings.append(Finding("BANNED", "double-extension", 0.0, f"{where}: {show(name)}"))
    elif extension in EXECUTABLE_EXTENSIONS:
        findings.append(Finding("BANNED", "executable-name", 0.0, f"{where}: {show(name)}"))
    if _CLSID.search(normalised):
        findings.append(Finding("BANNED", "clsid-extension", 0.0, f"{where}: {show(name)}"))
    return findings


def _judge_type(
    kinds: Iterable[str | None], where: str, rules: tuple[tuple[float, str], ...], builtin: bool
) -> list[Finding]:
    findings: list[Finding] = []
    present = {kind.lower() for kind in kinds if kind}
    for score, value in rules:
        for kind in sorted(present):
            if kind == value or (value.endswith("/*") and kind.startswith(value[:-1])):
                findings.append(Finding("BANNED", "mime-reject", score, f"{where}: {kind}"))
    if builtin:
        for kind in sorted(present & sniff.EXECUTABLES):
            findings.append(Finding("BANNED", "executable-content", 0.0, f"{where}: {kind}"))
    return findings


def _builtin_part_rules(parsed: ParsedMessage, part: Part) -> list[Finding]:
    findings: list[Finding] = []
    if "message/partial" in (part.content_type, part.declared_type):
        findings.append(
            Finding("BANNED", "message-partial", 0.0, f"{part.label}: fragments cannot be scanned")
        )
    is_tnef = (
        part.content_type in _TNEF_TYPES
        or part.sniffed == sniff.TNEF
        or any(normalise_name(name) == "winmail.dat" for name in part.filenames)
    )
    if is_tnef and not part.is_container:
        findings.append(
            Finding("BANNED", "undecipherable", 0.0, f"{part.label}: TNEF is not decoded")
        )
    if part.sniffed == sniff.ZIP and any(
        normalise_name(name).endswith(_MACRO_FREE) for name in part.filenames
    ):
        listing = parsed.listing(part)
        members = {member.name.lower() for member in listing.members} if listing else set()
        if members & set(_MACRO_MEMBERS):
            findings.append(
                Finding(
                    "BANNED",
                    "macro-document-disguised",
                    0.0,
                    f"{part.label}: macros inside a macro-free document name",
                )
            )
    return findings


def _unique(findings: list[Finding]) -> list[Finding]:
    return list(dict.fromkeys(findings))
