"""From a message, its envelope and the transaction's profile to a verdict.

A verdict names the category that won (VIRUS > BANNED > SPAM > BADH, or None for clean)
and its destiny: `pass` (relay), `discard` (quarantine, answer 250), `bounce` (quarantine,
answer 5xx so that the sending MTA bounces) or `reject` (answer 5xx, keep nothing).

`CheckPolicy` runs every check a profile asks for on one parse of the message:
  VIRUS   the profile's virus_scan signatures and clamd, over the raw message, every
          decoded part, files embedded in text parts and (signatures) archive members;
  BANNED  filename_reject / mime_reject and the built-in rules (checks/banned.py);
  SPAM    the scored header/body/address rules, the DNS checks when a `dns_checks` hook is
          given, and spamd's score times the profile's `spamassassin` weight (messages up
          to spam_max_size only); spam when the sum reaches reject_score;
  BADH    defects of the header section and of the MIME structure.
The CPU-bound part (parsing, archive listing, signature scan, rules) runs on the event
loop for messages under `inline_limit` bytes (handing them to a thread costs more than the
work) and in a worker thread for larger ones, so the loop keeps serving other sessions;
the whole decision is bounded by `timeout`, after which the worker answers 451.

A virus scan that could not be completed is never "clean": with VIRUS_SCAN_FAIL=tempfail
(the default) `decide` raises `TemporaryFailure` and the worker answers 451; with
`pass-with-header` the message goes on marked `X-Virus-Status: Unscanned`; with
`quarantine` it is held in the VIRUS quarantine (discard) unless its own verdict already
holds it.

Passed mail gets `X-Virus-Scanned`, `X-Spam-Status/Level/Score` (naming the tests that
hit, also below reject_score) and, for spam, the profile's `subject_tag`; mime_strip /
mime_allow remove parts from it (a message left without any part is refused). Held mail
goes to the quarantine with amavisd-new's header fields (`X-Amavis-Alert`, `X-Spam-*`), so
the viewer shows the virus names, banned parts and failed tests.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.generator import BytesGenerator
from email.header import Header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from io import BytesIO
from typing import Any, Protocol

from mailfilter import mime
from mailfilter.checks.banned import check_banned
from mailfilter.checks.clamd import ClamdClient, ClamdResult, clamd_findings
from mailfilter.checks.headers import check_headers
from mailfilter.checks.rules import check_rules
from mailfilter.checks.spamd import (
    SpamdClient,
    SpamResult,
    spam_findings,
    spam_headers,
    spam_level,
    unscanned_headers,
)
from mailfilter.checks.virus import SignatureLibrary, check_virus
from mailfilter.config import VIRUS_SCAN_FAIL_POLICIES, FilterConfig
from mailfilter.findings import Finding
from mailfilter.profiles import BUILTIN_SIGNATURES, Profile, ProfileSet, parse_profile
from mailfilter.stats import Stats

log = logging.getLogger(__name__)

DESTINIES = ("pass", "discard", "bounce", "reject")
CATEGORY_ORDER = ("VIRUS", "BANNED", "SPAM", "BADH")
# Banned findings named in the quarantine header block, at most (amavisd-new names one).
MAX_BANNED_ALERTS = 10
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_LABEL = re.compile(r" \([^()]*\)$")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_SUBJECT = re.compile(rb"^subject:[ \t]*", re.IGNORECASE | re.MULTILINE)

DnsChecks = Callable[["mime.ParsedMessage", "Envelope", Profile], Awaitable[Sequence[Finding]]]


@dataclass(frozen=True)
class Envelope:
    """What the engine knows of a transaction besides its content."""

    sender: str
    recipients: Sequence[str]
    client_address: str = ""
    client_name: str = ""
    helo: str = ""
    smtputf8: bool = False
    # The client is one of FILTER_RELAY_IPS (outbound mail, relay profile).
    relay_client: bool = False


@dataclass(frozen=True)
class Verdict:
    category: str | None
    destiny: str
    reasons: Sequence[str] = ()
    # Header fields to put on top of a passed message, e.g. X-Spam-Status.
    headers: Sequence[tuple[str, str]] = field(default=())
    # The SMTP reply's reason text, amavisd-new style ("INFECTED: Eicar-Test-Signature").
    summary: str = ""
    # A passed message as it is to be relayed, when the checks changed it (subject_tag,
    # mime_strip); None: the received bytes.
    message: bytes | None = None
    # amavisd-new quarantine header fields for a held message (X-Amavis-Alert, X-Spam-*).
    quarantine_headers: Sequence[tuple[str, str]] = field(default=())
    findings: Sequence[Finding] = field(default=())

    def __post_init__(self) -> None:
        if self.destiny not in DESTINIES:
            raise ValueError(f"unknown destiny {self.destiny!r}")
        if self.category is not None and self.category not in CATEGORY_ORDER:
            raise ValueError(f"unknown category {self.category!r}")


CLEAN = Verdict(category=None, destiny="pass")


class TemporaryFailure(Exception):
    """The checks cannot decide now (a scanner is down, time ran out): answer 4xx."""

    def __init__(self, reason: str, *, label: str = "checks") -> None:
        super().__init__(reason)
        self.label = label


class Policy(Protocol):
    async def decide(self, message: bytes, envelope: Envelope, profile: Profile) -> Verdict: ...


def _profile_reject(profile: Profile) -> Verdict:
    reason = f"profile {profile.name} rejects all mail"
    return Verdict(category=None, destiny="reject", reasons=(reason,), summary=reason)


class ProfilePolicy:
    """The worker's policy when it is given none: only the profile's `reject=1` switch
    (MessageWall's way to refuse all mail for an address). `runfilter` uses CheckPolicy."""

    async def decide(self, message: bytes, envelope: Envelope, profile: Profile) -> Verdict:
        if profile.reject:
            return _profile_reject(profile)
        return CLEAN


async def decide(message: bytes, envelope: Envelope, profile: Profile) -> Verdict:
    """The verdict of the checks-free policy."""
    return await ProfilePolicy().decide(message, envelope, profile)


# -- built-in profiles ------------------------------------------------------------------

_BANNED_NAMES = (".exe", ".scr", ".pif", ".bat", ".cmd", ".vbs", ".vbe", ".jse", ".wsf",
                 ".wsh", ".hta", ".cpl", ".msi", ".lnk", ".ps1")
_BANNED_TYPES = ("application/x-msdownload", "application/x-msdos-program", "application/hta")


def _builtin(name: str, lines: Sequence[str]) -> Profile:
    return parse_profile("\n".join(lines) + "\n", name=name)


# Without PROFILE_DIR every recipient gets this profile: the example Medium without its
# DNS block list (the appliance's spam level, SpamAssassin counted in full, EICAR, the
# usual executable names and types banned, in archives too).
BUILTIN_DEFAULT_PROFILE = _builtin(
    "default",
    [
        "reject_score=6.31",
        "spamassassin=1",
        "subject_tag=[SPAM]",
        f"virus_scan=1,{BUILTIN_SIGNATURES / 'default.sigs'}",
        *(f"filename_reject=1,{name}" for name in _BANNED_NAMES),
        *(f"mime_reject=1,{kind}" for kind in _BANNED_TYPES),
    ],
)
# ... and mail of our own clients (FILTER_RELAY_IPS) this one: the example Relay.
BUILTIN_RELAY_PROFILE = _builtin(
    "relay",
    [
        "reject_score=10",
        "spamassassin=1",
        f"virus_scan=1,{BUILTIN_SIGNATURES / 'default.sigs'}",
        "virus_destiny=reject",
        "banned_destiny=reject",
        "spam_destiny=reject",
        *(f"filename_reject=1,{name}" for name in _BANNED_NAMES[:3] + (".hta", ".lnk")),
    ],
)


class ProfileChooser:
    """The worker's RecipientLookup: a profile per envelope recipient.

    With a ProfileSet, `ProfileSet.choose_profile` (special users, then the domain, then
    the default profile); without one, the built-in default profile for everybody.
    `relay_profile()` is the profile of mail our own clients send out.
    """

    def __init__(
        self,
        profiles: ProfileSet | None = None,
        *,
        default: Profile = BUILTIN_DEFAULT_PROFILE,
        relay: Profile = BUILTIN_RELAY_PROFILE,
    ) -> None:
        self.profiles = profiles
        self.default = default
        self.relay = relay

    async def profile_for(self, address: str) -> Profile:
        profiles = self.profiles
        if profiles is None:
            return self.default
        return profiles.choose_profile(address)

    def relay_profile(self) -> Profile:
        profiles = self.profiles
        if profiles is None or profiles.relay_profile is None:
            return self.relay
        return profiles[profiles.relay_profile]


# -- the checks -------------------------------------------------------------------------


@dataclass
class _Analysis:
    """What the thread part of the checks found."""

    parsed: mime.ParsedMessage
    blobs: list[tuple[str, bytes]]
    findings: list[Finding]
    # The message without the parts mime_strip/mime_allow remove (None: nothing removed),
    # and whether anything worth delivering is left.
    stripped: bytes | None = None
    nothing_left: bool = False


def _analyse(
    message: bytes,
    envelope: Envelope,
    profile: Profile,
    library: SignatureLibrary,
    limits: mime.MimeLimits,
) -> _Analysis:
    """Parse once and run the checks that need no network (blocking: a large message is
    run in a thread)."""
    parsed = mime.parse_message(message, limits=limits)
    blobs = list(parsed.scan_blobs())
    findings: list[Finding] = []
    if profile.virus_scan:
        members = [
            (f"{where}: {member.path}", member)
            for where, listing in parsed.listings()
            for member in listing.members
        ]
        scanned = [(label, member.data) for label, member in members if member.data]
        findings += check_virus([*blobs, *scanned], profile=profile, library=library)
        # A member too large to keep was not offered to the signature scan: the message
        # cannot pass as clean, so it is banned like other content that was not looked into.
        kept_mb = parsed.limits.archive_limits.max_kept_bytes / 2**20
        findings += [
            Finding(
                "BANNED",
                "unscannable",
                0.0,
                f"{label}: {member.size} bytes, over the {kept_mb:g} MB the signature scan"
                " is given",
            )
            for label, member in members
            if member.unscanned
        ]
    findings += check_banned(
        parsed,
        filename_reject=profile.filename_reject,
        mime_reject=profile.mime_reject,
        allow_banned_in_archives=profile.allow_banned_in_archives,
        # A profile that bans nothing (None, Reject) gets no built-in name rules either;
        # content that could not be looked into is banned whatever the profile.
        builtin=bool(profile.filename_reject or profile.mime_reject),
    )
    raw_headers = [(name, value.decode("utf-8", "replace")) for name, value in parsed.headers]
    headers = [(name, mime.decode_header_value(value)) for name, value in raw_headers]
    texts = [
        mime.decode_charset(part.payload, _charset(part))
        for part in parsed.walk()
        if part.content_type.startswith("text/")
    ]
    findings += check_rules(
        headers, texts, sender=envelope.sender, recipients=envelope.recipients, profile=profile,
        address_headers=raw_headers,
    )
    findings += check_headers(parsed, utf8_headers=envelope.smtputf8)
    analysis = _Analysis(parsed=parsed, blobs=blobs, findings=findings)
    if (profile.mime_strip or profile.mime_allow) and not parsed.unscannable:
        analysis.stripped, analysis.nothing_left = strip_parts(
            message, strip=profile.mime_strip, allow=profile.mime_allow
        )
    return analysis


def _charset(part: mime.Part) -> str:
    for name, value in part.params:
        if name.lower() == "charset":
            return value
    return "utf-8"


class CheckPolicy:
    """Every check a profile asks for; see the module docstring.

    `clamd` / `spamd`: clients, or None when the worker has no such daemon.
    `dns_checks`: an async callable `(parsed, envelope, profile) -> SPAM findings` for the
    profile's dnsbl, dnsbl_domain, rdns_required and rmx_required; None: not checked. A
    hook with a `prepare(envelope, profile)` method can start its queries before the
    message arrives (see `prepare`) and is then called with them as a fourth argument.
    `stats`: the worker's counters (verdicts by category, defects, banned kinds).
    `inline_limit`: messages smaller than this many bytes are parsed and scanned on the
    event loop, larger ones in a worker thread.
    """

    def __init__(
        self,
        *,
        signatures: SignatureLibrary | None = None,
        clamd: ClamdClient | None = None,
        spamd: SpamdClient | None = None,
        virus_scan_fail: str = "tempfail",
        timeout: float = 90.0,
        dns_checks: DnsChecks | None = None,
        stats: Stats | None = None,
        scanner_name: str = "spamviewer",
        mime_limits: mime.MimeLimits = mime.DEFAULT_LIMITS,
        inline_limit: int = 256 * 1024,
    ) -> None:
        if virus_scan_fail not in VIRUS_SCAN_FAIL_POLICIES:
            raise ValueError(f"virus_scan_fail: unknown policy {virus_scan_fail!r}")
        self.signatures = signatures if signatures is not None else SignatureLibrary()
        self.clamd = clamd
        self.spamd = spamd
        self.virus_scan_fail = virus_scan_fail
        self.timeout = timeout
        self.dns_checks = dns_checks
        self.stats = stats if stats is not None else Stats()
        self.scanner_name = _printable(scanner_name) or "spamviewer"
        self.mime_limits = mime_limits
        self.inline_limit = inline_limit

    def prepare(self, envelope: Envelope, profile: Profile) -> object | None:
        """Start the DNS queries that need only the envelope (client address, sender);
        called by the worker at the first accepted RCPT. Returns them, to be given to
        `decide` as `prepared` (or cancelled with their `cancel()` if no message comes),
        or None when there is nothing to start."""
        if self.dns_checks is None or profile.reject:
            return None
        start = getattr(self.dns_checks, "prepare", None)
        if start is None:
            return None
        return start(envelope, profile)

    async def decide(
        self, message: bytes, envelope: Envelope, profile: Profile, *, prepared=None
    ) -> Verdict:
        try:
            if profile.reject:
                return _profile_reject(profile)
            if not self._waits(message, profile):
                # The checks run straight through, which no timeout could interrupt, and
                # the task wait_for would start costs more than the checks of small mail.
                return await self._decide(message, envelope, profile, prepared)
            try:
                verdict = await asyncio.wait_for(
                    self._decide(message, envelope, profile, prepared), self.timeout
                )
            except TimeoutError:
                raise TemporaryFailure(
                    f"content checks took longer than {self.timeout:g}s", label="check_timeout"
                ) from None
            return verdict
        finally:
            if prepared is not None:
                prepared.cancel()

    def _waits(self, message: bytes, profile: Profile) -> bool:
        """Whether deciding on `message` awaits anything: a thread, clamd, spamd or DNS."""
        return (
            len(message) >= self.inline_limit
            or self.clamd is not None
            or (self.spamd is not None and profile.spamassassin > 0)
            or self.dns_checks is not None
        )

    async def _decide(
        self, message: bytes, envelope: Envelope, profile: Profile, prepared=None
    ) -> Verdict:
        # One library for the whole message, even if a reload swaps it meanwhile.
        library = self.signatures
        if len(message) < self.inline_limit:
            analysis = _analyse(message, envelope, profile, library, self.mime_limits)
        else:
            analysis = await asyncio.to_thread(
                _analyse, message, envelope, profile, library, self.mime_limits
            )
        findings = list(analysis.findings)
        already_held = any(f.category in ("VIRUS", "BANNED") for f in findings)
        spam_asked = self.spamd is not None and profile.spamassassin > 0
        clamd_result, spam_result, dns_found = await _concurrently(
            self._clamd(analysis.blobs) if self.clamd is not None else None,
            # Spam does not matter once a virus or a banned part decides the message.
            self._spamd(message, profile) if spam_asked and not already_held else None,
            self._dns(analysis.parsed, envelope, profile, prepared)
            if self.dns_checks is not None
            else None,
        )
        dns_findings: list[Finding] = dns_found or []
        scan_error = ""
        if clamd_result is not None:
            if clamd_result.found:
                findings += clamd_findings(clamd_result)
                self.stats.inc("viruses_found", label="clamd")
            elif clamd_result.error:
                scan_error = clamd_result.reason
                self.stats.inc("scanner_errors", label="clamd")
                log.warning("virus scan failed: %s", scan_error)
        if any(f.category == "VIRUS" and not f.detail.startswith("clamd:") for f in findings):
            self.stats.inc("viruses_found", label="signatures")
        if spam_result is not None:
            if spam_result.status == "error":
                self.stats.inc("scanner_errors", label="spamd")
                log.warning("spam scan failed: %s", spam_result.reason)
            findings += spam_findings(spam_result, weight=profile.spamassassin)
        findings += dns_findings
        return self._verdict(
            findings, profile, message, analysis,
            scan_error=scan_error, spam_result=spam_result, spam_asked=spam_asked,
        )

    async def _clamd(self, blobs: list[tuple[str, bytes]]) -> ClamdResult:
        assert self.clamd is not None
        return await self.clamd.scan_blobs(blobs)

    async def _spamd(self, message: bytes, profile: Profile) -> SpamResult:
        assert self.spamd is not None
        return await self.spamd.check(message, max_size=profile.spam_max_size)

    async def _dns(
        self, parsed: mime.ParsedMessage, envelope: Envelope, profile: Profile, prepared=None
    ) -> list[Finding]:
        assert self.dns_checks is not None
        if prepared is not None:
            found = await self.dns_checks(parsed, envelope, profile, prepared)  # type: ignore[call-arg]
        else:
            found = await self.dns_checks(parsed, envelope, profile)
        return [f for f in found if f.category == "SPAM"]

    def _verdict(
        self,
        findings: list[Finding],
        profile: Profile,
        message: bytes,
        analysis: _Analysis,
        *,
        scan_error: str,
        spam_result: SpamResult | None,
        spam_asked: bool,
    ) -> Verdict:
        virus = [f for f in findings if f.category == "VIRUS"]
        banned = [f for f in findings if f.category == "BANNED"]
        spam = [f for f in findings if f.category == "SPAM"]
        badh = [f for f in findings if f.category == "BADH"]
        # Rounded as the profile writes scores: 0.7 + 0.1 reaches a reject_score of 0.8,
        # though in binary floating point it falls short by 1e-16.
        score = round(sum(f.score for f in spam), 6)
        is_spam = bool(spam) and score >= profile.reject_score
        for name in dict.fromkeys(f.name for f in badh):
            self.stats.inc("badh_defects", label=name)
        for name in dict.fromkeys(f.name for f in banned):
            self.stats.inc("banned_reasons", label=name)

        category: str | None = None
        for candidate, hits in (("VIRUS", virus), ("BANNED", banned), ("SPAM", is_spam),
                                ("BADH", badh)):
            if hits:
                category = candidate
                break
        destiny = profile.destiny(category) if category else "pass"
        unscanned = ""
        if scan_error and category != "VIRUS":
            if self.virus_scan_fail == "tempfail":
                self.stats.inc("verdicts", label="TEMPFAIL")
                raise TemporaryFailure(f"virus scan failed: {scan_error}", label="virus_scan")
            if self.virus_scan_fail == "quarantine" and destiny == "pass":
                category, destiny = "VIRUS", "discard"
                virus = [Finding("VIRUS", "UNCHECKED", 0.0, f"virus scan failed: {scan_error}")]
            else:
                unscanned = scan_error
        self.stats.inc("verdicts", label=category or "CLEAN")

        names = list(dict.fromkeys(_LABEL.sub("", f.name) for f in virus))
        tests = [*(f"{f.name}={f.score:g}" for f in spam if f.name != "spamassassin"),
                 *(spam_result.tests if spam_result is not None and spam_result.scanned else ())]
        reasons: list[str] = {
            "VIRUS": names,
            "BANNED": [f"{f.name},{f.detail}" for f in banned],
            "SPAM": [f.detail or f.name for f in spam],
            "BADH": [f"{f.name}: {f.detail}" for f in badh],
        }.get(category or "", [])
        summary = ""
        if category == "VIRUS":
            summary = "INFECTED: " + ", ".join(names)
        elif category == "BANNED":
            summary = f"BANNED: {banned[0].name},{banned[0].detail}"
        elif category == "SPAM":
            summary = "spam"
        elif category == "BADH":
            summary = f"BAD HEADER: {badh[0].name}: {badh[0].detail}"
        summary = _printable(summary)[:200]

        alerts: list[tuple[str, str]] = []
        if virus:
            text = "INFECTED, message contains virus: " + ", ".join(names)
            alerts.append(("X-Amavis-Alert", text))
        for finding in banned[:MAX_BANNED_ALERTS]:
            alerts.append(
                ("X-Amavis-Alert", f"BANNED, message contains {finding.name},{finding.detail}")
            )
        if badh:
            alerts.append(
                ("X-Amavis-Alert", f"BAD HEADER SECTION, {badh[0].name}: {badh[0].detail}")
            )
        alerts = [(name, _printable(value)[:1000]) for name, value in alerts]

        if destiny != "pass":
            return Verdict(
                category=category,
                destiny=destiny,
                reasons=tuple(reasons),
                summary=summary,
                quarantine_headers=(
                    *alerts,
                    *_quarantine_spam_fields(
                        is_spam=is_spam, score=score, required=profile.reject_score,
                        tests=tests, skipped=bool(virus) and not spam,
                    ),
                ),
                findings=tuple(findings),
            )

        relayed = message
        if analysis.stripped is not None or analysis.nothing_left:
            if analysis.nothing_left:
                reason = "no part of the message is left after mime_strip/mime_allow"
                return Verdict(category=None, destiny="reject", reasons=(reason,),
                               summary=reason, findings=tuple(findings))
            relayed = analysis.stripped or message
        headers: list[tuple[str, str]] = [("X-Virus-Scanned", self.scanner_name)]
        if unscanned:
            headers.append(("X-Virus-Status", "Unscanned, reason=error"))
        headers += alerts
        if spam_asked and spam_result is not None and not spam_result.scanned:
            headers += unscanned_headers(spam_result)
            headers += [("X-Spam-Level", spam_level(score)), ("X-Spam-Score", f"{score:.3f}")]
        else:
            headers += spam_headers(
                is_spam=is_spam, score=score, required=profile.reject_score, tests=[
                    *(f.name for f in spam if f.name != "spamassassin"),
                    *(spam_result.tests if spam_result is not None else ()),
                ],
            )
        if category == "SPAM" and profile.subject_tag:
            relayed = tag_subject(relayed, profile.subject_tag)
        return Verdict(
            category=category,
            destiny="pass",
            reasons=tuple(reasons),
            headers=tuple((name, value) for name, value in headers if value != ""),
            summary=summary,
            message=None if relayed is message else relayed,
            findings=tuple(findings),
        )


async def _concurrently(*calls: Awaitable[Any] | None) -> list[Any]:
    """The results of `calls`, run concurrently; None for a call that is None.

    A lone call is awaited in the current task: a task of its own would cost more than
    the local checks of a small message, and there is nothing to overlap it with.
    """
    live = [call for call in calls if call is not None]
    if len(live) > 1:
        done = iter(await asyncio.gather(*live))
    else:
        done = iter([await call for call in live])
    return [None if call is None else next(done) for call in calls]


def _printable(text: str) -> str:
    """ASCII text for an SMTP reply or a header field: anything else becomes '?'."""
    return " ".join(_UNPRINTABLE.sub("?", text).split())


def _quarantine_spam_fields(
    *, is_spam: bool, score: float, required: float, tests: Sequence[str], skipped: bool
) -> list[tuple[str, str]]:
    """X-Spam-Flag/Score/Level/Status as amavisd-new writes them in a quarantine file;
    `score=x` when the spam checks did not matter (a virus was found first)."""
    listed = ", ".join(_printable(t).replace("]", ")") for t in tests)
    if skipped:
        status = f"No, score=x tag=x tag2={required:g} kill={required:g} tests=[{listed}]"
        return [("X-Spam-Flag", "NO"), ("X-Spam-Status", status)]
    fields = [
        ("X-Spam-Flag", "YES" if is_spam else "NO"),
        ("X-Spam-Score", f"{max(score, 0.0):.3f}"),
    ]
    level = "*" * min(max(int(score), 0), 64)
    if level:
        fields.append(("X-Spam-Level", level))
    status = (
        f"{'Yes' if is_spam else 'No'}, score={score:.3f} tag=x tag2={required:g} "
        f"kill={required:g} tests=[{listed}] autolearn=disabled"
    )
    fields.append(("X-Spam-Status", status))
    return fields


def tag_subject(message: bytes, tag: str) -> bytes:
    """`tag` and a space put before the first Subject's value (a Subject added if none)."""
    end = _HEADER_END.search(message)
    head_end = end.start() if end else len(message)
    encoded = tag if tag.isascii() else Header(tag, "utf-8").encode()
    found = _SUBJECT.search(message, 0, head_end)
    if found is None:
        return f"Subject: {encoded}\r\n".encode("ascii") + message
    return message[: found.end()] + encoded.encode("ascii") + b" " + message[found.end():]


def _type_matches(content_type: str, rule: str) -> bool:
    if rule == content_type or rule == "*" or rule == "*/*":
        return True
    if "/" not in rule:
        return content_type.split("/", 1)[0] == rule
    return rule.endswith("/*") and content_type.startswith(rule[:-1])


def strip_parts(
    message: bytes, *, strip: Sequence[str] = (), allow: Sequence[str] = ()
) -> tuple[bytes | None, bool]:
    """The message without the leaf parts mime_strip names (or mime_allow does not name;
    mime_allow wins). Returns (new bytes or None when nothing was removed, nothing_left)."""

    def wanted(part: Message) -> bool:
        kind = part.get_content_type().lower()
        if allow:
            return any(_type_matches(kind, rule) for rule in allow)
        return not any(_type_matches(kind, rule) for rule in strip)

    removed = 0

    def prune(node: Message) -> bool:
        nonlocal removed
        if not node.is_multipart():
            return wanted(node)
        children = node.get_payload()
        kept = [child for child in children if isinstance(child, Message) and prune(child)]
        if len(kept) != len(children):
            removed += len(children) - len(kept)
            node.set_payload(kept)
        return bool(kept)

    try:
        tree = BytesParser(policy=compat32).parsebytes(message)
        left = prune(tree)
        if not left:
            return None, True
        if not removed:
            return None, False
        out = BytesIO()
        BytesGenerator(out, mangle_from_=False, policy=compat32.clone(linesep="\r\n")).flatten(
            tree
        )
    except Exception:
        # The parse in mailfilter.mime already judged the structure; a message Python's
        # generator cannot write back is delivered unchanged rather than lost.
        log.exception("mime_strip could not rewrite the message; delivering it unchanged")
        return None, False
    return out.getvalue(), False


# -- the whole set, from the configuration ------------------------------------------------


class FilterChecks:
    """The profiles, signatures and policy of one worker, reloaded together.

    `reload()` builds a complete new profile set and signature library first and swaps
    both in only when both loaded; on ProfileError / SignatureError (raised, with file,
    line and reason) the ones in use stay.
    """

    def __init__(
        self,
        config: FilterConfig,
        *,
        stats: Stats | None = None,
        dns_checks: DnsChecks | None = None,
    ) -> None:
        self.config = config
        self.stats = stats if stats is not None else Stats()
        profiles, signatures = self._load()
        self.lookup = ProfileChooser(profiles)
        clamd = None
        if config.clamd_socket or config.clamd_host:
            clamd = ClamdClient(
                host=config.clamd_host or "127.0.0.1",
                port=config.clamd_port,
                path=config.clamd_socket or None,
                timeout=config.clamd_timeout,
            )
        spamd = None
        if config.spamd_host:
            spamd = SpamdClient(
                host=config.spamd_host, port=config.spamd_port, timeout=config.spamd_timeout
            )
        if dns_checks is None and config.dns_servers:
            dns_checks = self._dns_hook(config)
        self.policy = CheckPolicy(
            signatures=signatures,
            clamd=clamd,
            spamd=spamd,
            virus_scan_fail=config.virus_scan_fail,
            timeout=config.check_timeout,
            dns_checks=dns_checks,
            stats=self.stats,
            scanner_name=f"spamviewer at {config.hostname}",
        )

    def _dns_hook(self, config: FilterConfig) -> DnsChecks:
        from mailfilter.checks import dns as dns_checks

        servers = None if config.dns_servers == ("system",) else list(config.dns_servers)
        checker = dns_checks.DnsChecker(
            nameservers=servers, timeout=config.dns_timeout / 2, lifetime=config.dns_timeout
        )
        stats = self.stats

        def count(error) -> None:
            stats.inc("dns_errors", label=error.check)

        return dns_checks.policy_hook(checker, on_error=count)

    def _load(self) -> tuple[ProfileSet | None, SignatureLibrary]:
        config = self.config
        if not config.profile_dir:
            files = {rule.value for p in (BUILTIN_DEFAULT_PROFILE, BUILTIN_RELAY_PROFILE)
                     for rule in p.virus_scan}
            return None, SignatureLibrary(files)
        profiles = ProfileSet.load(
            config.profile_dir,
            default_profile=config.default_profile,
            relay_profile=config.relay_profile or None,
            special_users=config.special_users or None,
        )
        return profiles, SignatureLibrary(profiles.signature_files())

    def reload(self) -> None:
        try:
            profiles, signatures = self._load()
        except Exception:
            self.stats.inc("reloads", label="failed")
            raise
        # Two assignments on the event loop's thread: a message being checked keeps the
        # profile and the library it started with.
        self.lookup.profiles = profiles
        self.policy.signatures = signatures
        self.stats.inc("reloads", label="ok")
