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
Addresses compare as the profile choice compares them (`profiles.address_key`): case does
not matter, nor whether a domain is written in Unicode or in IDNA A-labels.

Address fields are read by a small tokenizer of our own, not `email.utils.getaddresses`:
its parser recurses once per nested comment (six hundred `(` end in RecursionError) and
spends seconds on a field of a megabyte. Ours takes each run of a special character as
one token, reads at most `_MAX_TOKENS` tokens of a field, and keeps a comma of a display
name that RFC 2047 decoding brought in (`=?iso-8859-1?Q?M=FCller=2C_Hans?= <h@...>`, as
Outlook writes "Last, First") inside that name: a comma ends a mailbox only once the
mailbox has an address.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

from mailfilter.findings import Finding
from mailfilter.profiles import HeaderMatch, Profile, Scored, address_key

_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _unfold(value: str) -> str:
    return _FOLD.sub("", value)


def _values(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    wanted = name.lower()
    return [_unfold(value) for field, value in headers if field.strip().lower() == wanted]


# Outside comments: a quoted string (unterminated: to the end), a run of "(" or ")", a
# quoted pair, one run of the same special character, or text. Inside comments only
# parentheses and quoted pairs matter (RFC 5322 3.2.2: a quote there is plain text).
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|\(+|\)+|\\.?|([<>,;:])\1*|[^"\\()<>,;:]+', re.S)
_COMMENT_TOKEN = re.compile(r"\(+|\)+|\\.?|[^\\()]+", re.S)
# Far more than a field of a thousand addresses needs; what lies beyond is not read.
_MAX_TOKENS = 50_000


class _Mailbox:
    """One mailbox being read: its phrase, its text outside and inside angle brackets."""

    __slots__ = ("phrase", "bare", "angle", "in_angle", "has_address")

    def __init__(self) -> None:
        self.phrase: list[str] = []
        self.bare: list[str] = []
        self.angle: list[str] | None = None
        self.in_angle = False
        self.has_address = False

    def add(self, text: str, phrase: str | None = None) -> None:
        # White space outside quoted strings is no part of an address (obsolete CFWS).
        address = text if text[0] == '"' else "".join(text.split())
        if self.in_angle:
            assert self.angle is not None
            self.angle.append(address)
        else:
            self.bare.append(address)
            self.phrase.append(text if phrase is None else phrase)
            # An "@" in a quoted display name makes no address; "john doe"@example.org
            # gets its "@" from the text after the quoted string.
            self.has_address = self.has_address or (text[0] != '"' and "@" in text)

    def open_angle(self) -> None:
        # The last angle address of a mailbox is its address.
        self.angle, self.in_angle, self.has_address = [], True, True

    def result(self) -> tuple[str, str] | None:
        if self.angle is not None:
            address = "".join(self.angle)
            if address.startswith("@"):
                # An obsolete source route: <@relay.example:user@example.org>.
                address = address.rpartition(":")[2]
            name = " ".join("".join(self.phrase).split())
        else:
            address, name = "".join(self.bare), ""
        return (name, address) if address else None


def _mailboxes(value: str) -> Iterator[tuple[str, str]]:
    """(display name, address) of each mailbox of an address field, in order."""
    current = _Mailbox()
    depth = 0
    position = 0
    for _ in range(_MAX_TOKENS):
        if position >= len(value):
            break
        token = (_COMMENT_TOKEN if depth else _TOKEN).match(value, position)
        assert token is not None
        text = token.group()
        position = token.end()
        first = text[0]
        if first == "(":
            depth += len(text)
        elif first == ")":
            depth = max(depth - len(text), 0)
        elif depth:
            continue
        elif first == "\\":
            current.add(text, text[1:])
        elif first == '"':
            current.add(text, text[1:].removesuffix('"').replace("\\", ""))
        elif first == "<":
            if not current.in_angle:
                current.open_angle()
        elif first == ">":
            current.in_angle = False
        elif first in ",;":
            if not current.in_angle and current.has_address:
                mailbox = current.result()
                if mailbox is not None:
                    yield mailbox
                current = _Mailbox()
        elif first == ":" and not current.in_angle and not current.has_address:
            # A group's name ("Friends: a@example.org, b@example.org;") is nobody's name.
            current = _Mailbox()
        else:
            current.add(text)
    mailbox = current.result()
    if mailbox is not None:
        yield mailbox


def _addresses(values: Iterable[str]) -> set[str]:
    return {address_key(address) for value in values for _, address in _mailboxes(value)}


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
    missing = [r for r in recipients if address_key(r) not in listed]
    detail = f"not in To/Cc: {', '.join(missing)}"
    return _flag(profile.to_cc_check, "to_cc_check", bool(missing), detail)


def check_from(
    headers: Sequence[tuple[str, str]], sender: str, *, profile: Profile
) -> list[Finding]:
    sender = sender.strip().strip("<>")
    if not profile.from_check.value or not sender:
        return []
    listed = _addresses(_values(headers, "From"))
    missing = address_key(sender) not in listed
    return _flag(profile.from_check, "from_check", missing, f"{sender.lower()} not in From")


def check_realname(headers: Sequence[tuple[str, str]], *, profile: Profile) -> list[Finding]:
    if not profile.realname_check.value:
        return []
    values = _values(headers, "From")
    first = next(_mailboxes(values[0]), None) if values else None
    # Only a mailbox with an <angle address> has a display name.
    named = first is not None and bool(first[0])
    return _flag(profile.realname_check, "realname_check", not named, "From has no real name")


def check_rules(
    headers: Sequence[tuple[str, str]],
    texts: Iterable[str],
    *,
    sender: str,
    recipients: Iterable[str],
    profile: Profile,
    address_headers: Sequence[tuple[str, str]] | None = None,
) -> list[Finding]:
    """All of a profile's header, body and address rules.

    `headers` have their encoded words decoded, for the header rules. The address checks
    read `address_headers` when given: the fields as sent, where an encoded word is text
    that can hold no address (RFC 2047 section 5), so one that decodes to `a@b.example,`
    puts no address into To or From."""
    addresses = headers if address_headers is None else address_headers
    return [
        *check_header_rules(headers, profile=profile),
        *check_body_rules(texts, profile=profile),
        *check_to_cc(addresses, recipients, profile=profile),
        *check_from(addresses, sender, profile=profile),
        *check_realname(addresses, profile=profile),
    ]
