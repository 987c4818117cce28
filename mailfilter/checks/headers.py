"""Bad headers and bad MIME: one BADH finding per kind of defect the parser recorded.

The finding's name is the defect's name (`8bit-in-header`, `duplicate-boundary`,
`invalid-base64-characters`...), so statistics can count each class, as amavis counts its
bad-header categories; the detail says where the first one was and how many there were.
"""

from __future__ import annotations

from mailfilter.findings import Finding
from mailfilter.mime import ParsedMessage


def check_headers(parsed: ParsedMessage) -> list[Finding]:
    first: dict[str, str] = {}
    counts: dict[str, int] = {}
    for defect in parsed.defects:
        first.setdefault(defect.name, defect.detail)
        counts[defect.name] = counts.get(defect.name, 0) + 1
    findings = []
    for name, detail in first.items():
        more = f" (and {counts[name] - 1} more)" if counts[name] > 1 else ""
        findings.append(Finding("BADH", name, 0.0, f"{detail}{more}"))
    return findings
