"""A profile's scored rules on plain data: header and body matches, To/Cc, From, real name.

Inputs are plain: `headers` is a sequence of `(name, value)` with values as text (RFC 2047
decoded, folded or not), `texts` the decoded text of each MIME part. Every rule that hits
gives one SPAM finding carrying its score; the policy sums them against reject_score.

  header_reject / header_rejecti   `Header:Key`: Key is searched for in the value of every
      field called Header (field names compare case-insensitively). Case-sensitive for
      header_reject, case-insensitive for header_rejecti. A Key written `/.../` is a
      regular expression instead of a substring (our addition).
  body_reject / body_rejecti       the value is searched for in each decoded part,
      case-sensitively or case-insensitively. Each rule counts once per message.
  to_cc_check     every envelope recipient must be among the To: and Cc: addresses.
  from_check      the envelope sender must be among the From: addresses. The null sender
      (bounces, RFC 3464 reports) is not checked: such messages never carry it in From:.
  realname_check  the first From: address must have a display name before its <address>.
Addresses compare case-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from email.utils import getaddresses

from mailfilter.findings import Finding
from mailfilter.profiles import HeaderMatch, Profile, Scored

_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _unfold(value: str) -> str:
    return _FOLD.sub("", value)


def _values(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    wanted = name.lower()
    return [_unfold(value) for field, value in headers if field.strip().lower() == wanted]


def _addresses(values: Iterable[str]) -> set[str]:
    return {address.strip().lower() for _, address in getaddresses(list(values)) if address}


def _header_hits(match: HeaderMatch, value: str, *, ignore_case: bool) -> bool:
    if match.pattern is not None:
        return match.pattern.search(value) is not None
    if ignore_case:
        return match.key.casefold() in value.casefold()
    return match.key in value


def check_header_rules(
    headers: Sequence[tuple[str, str]], *, profile: Profile
) -> list[Finding]:
    findings = []
    for variable, rules, ignore_case in (
        ("header_reject", profile.header_reject, False),
        ("header_rejecti", profile.header_rejecti, True),
    ):
        for rule in rules:
            match = rule.value
            for value in _values(headers, match.header):
                if _header_hits(match, value, ignore_case=ignore_case):
                    detail = f"{match.header}: matched {match.key!r}"
                    findings.append(Finding("SPAM", variable, rule.score, detail))
                    break
    return findings


def check_body_rules(texts: Iterable[str], *, profile: Profile) -> list[Finding]:
    texts = list(texts)
    folded = [text.casefold() for text in texts] if profile.body_rejecti else []
    findings = []
    for rule in profile.body_reject:
        if any(rule.value in text for text in texts):
            findings.append(Finding("SPAM", "body_reject", rule.score, f"body has {rule.value!r}"))
    for rule in profile.body_rejecti:
        needle = rule.value.casefold()
        if any(needle in text for text in folded):
            findings.append(
                Finding("SPAM", "body_rejecti", rule.score, f"body has {rule.value!r}")
            )
    return findings


def _flag(check: Scored[bool], name: str, failed: bool, detail: str) -> list[Finding]:
    if check.value and failed:
        return [Finding("SPAM", name, check.score, detail)]
    return []


def check_to_cc(
    headers: Sequence[tuple[str, str]], recipients: Iterable[str], *, profile: Profile
) -> list[Finding]:
    if not profile.to_cc_check.value:
        return []
    listed = _addresses(_values(headers, "To") + _values(headers, "Cc"))
    missing = [r for r in recipients if r.strip().strip("<>").lower() not in listed]
    detail = f"not in To/Cc: {', '.join(missing)}"
    return _flag(profile.to_cc_check, "to_cc_check", bool(missing), detail)


def check_from(
    headers: Sequence[tuple[str, str]], sender: str, *, profile: Profile
) -> list[Finding]:
    sender = sender.strip().strip("<>").lower()
    if not profile.from_check.value or not sender:
        return []
    listed = _addresses(_values(headers, "From"))
    return _flag(profile.from_check, "from_check", sender not in listed, f"{sender} not in From")


def check_realname(headers: Sequence[tuple[str, str]], *, profile: Profile) -> list[Finding]:
    if not profile.realname_check.value:
        return []
    values = _values(headers, "From")
    named = False
    if values:
        pairs = getaddresses([values[0]])
        named = bool(pairs and pairs[0][0].strip() and "<" in values[0])
    return _flag(profile.realname_check, "realname_check", not named, "From has no real name")


def check_rules(
    headers: Sequence[tuple[str, str]],
    texts: Iterable[str],
    *,
    sender: str,
    recipients: Iterable[str],
    profile: Profile,
) -> list[Finding]:
    """All of a profile's header, body and address rules."""
    return [
        *check_header_rules(headers, profile=profile),
        *check_body_rules(texts, profile=profile),
        *check_to_cc(headers, recipients, profile=profile),
        *check_from(headers, sender, profile=profile),
        *check_realname(headers, profile=profile),
    ]
