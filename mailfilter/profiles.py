"""MessageWall profiles: files of `name=value` lines, one profile per file.

Every regular file in the profile directory is a profile named after the file (files whose
name starts with a dot, such as editor swap files, are skipped). The syntax is
messagewall_profiles(5)'s:

    # a comment (a line whose first non-blank character is '#'); blank lines are ignored
    reject_score=5                      a regular variable: name=value
    header_rejecti=2,X-Mailer:gold      a scored variable: name=score,value
    body_rejecti=viagra                 ... whose score defaults to 1 when omitted

When the text after `=` of a scored variable contains a comma, the part before the first
comma must be the score, so `header_reject=Subject:a,b` is refused: it has to be written
`header_reject=1,Subject:a,b`. Scores are numbers (`2`, `0.5`, `-1`). The value is taken
exactly as written up to the end of the line (quotes are not special); spaces around the
variable name are ignored.

Files are UTF-8; a byte order mark at the start is ignored. A file is refused as a whole,
with its path, the line number and the reason, when a line is not `name=value`, the name
is unknown, a score or value does not parse, a single-valued variable is set twice, the
file sets nothing at all, or it is not valid UTF-8 (the line of the first bad byte); with
its path and the reason when it is larger than MAX_PROFILE_BYTES or cannot be read.
`load_profiles` refuses the whole directory when one file is refused, and
`ProfileSet.reload` keeps the profiles it had.

The variables of MessageWall keep their documented meaning and default; the ones we add are
marked as ours below (`Profile`). A relative `virus_scan` file is looked for in the profile
directory first, then among the signature files shipped in `mailfilter/signatures/`, so
`virus_scan=1,default.sigs` names the built-in set.

Profile choice (`ProfileSet.choose_profile`) follows messagewall(1): mail relayed for our
own clients (from `relay_ips`, or authenticated) gets `relay_profile`; other mail gets the
profile that the special-users file names for the recipient's address, else for its
domain, else `default_profile`. The special-users file has one `KEY PROFILE NAME` line per
entry, KEY being an address or a domain (`example.org` or `@example.org`), and the rest of
the line a profile name (which may contain spaces, like `Medium Plus`). Keys and recipients
compare by `address_key`: case does not matter, nor a final dot, nor whether a domain is
written in Unicode (`bücher.example`) or in IDNA A-labels (`xn--bcher-kva.example`).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

import idna

T = TypeVar("T")

DESTINIES = ("pass", "discard", "bounce", "reject")
BUILTIN_SIGNATURES = Path(__file__).resolve().parent / "signatures"

_HEADER_NAME = re.compile(r"[!-9;-~]+")
_ZONE = re.compile(r"(?=.{1,253}$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_MIME_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*(/[A-Za-z0-9*][A-Za-z0-9!#$&^_.+*-]*)?")


class ProfileError(ValueError):
    """A profile (or special-users) file that cannot be used; names file, line and reason."""

    def __init__(self, path: str | os.PathLike[str], line: int, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {reason}")


class Scored(NamedTuple, Generic[T]):
    """A scored variable's line: the score it adds and its value.

    It is a `(score, value)` pair, the form the banned-attachment check takes as rules.
    """

    score: float
    value: T


@dataclass(frozen=True)
class HeaderMatch:
    """`Header:Key` of header_reject/header_rejecti: Key searched for in Header's values.

    A Key written `/.../` is a regular expression (our addition); any other Key is a plain
    substring, as in MessageWall.
    """

    header: str
    key: str
    pattern: re.Pattern[str] | None = None


@dataclass(frozen=True)
class DnsList:
    """A dnsbl/dnsbl_domain zone and the answer it must give, if one was written (`/ip`)."""

    zone: str
    answer: ipaddress.IPv4Address | None = None


_OFF = Scored(1.0, False)


@dataclass(frozen=True)
class Profile:
    """One profile. Defaults are MessageWall's, or the appliance's for our additions.

    MessageWall's regular variables:
      reject        all mail for this profile is refused (default off)
      reject_score  the sum of scores at which a message is spam (default 1)
      mime_strip    MIME types (case-insensitive) whose parts are removed
      mime_allow    the only MIME types kept; when present, mime_strip is ignored
    MessageWall's scored variables (score 1 when omitted):
      to_cc_check, from_check, realname_check, rdns_required, rmx_required   (0 or 1)
      header_reject, header_rejecti   Header:Key, case-sensitive / -insensitive
      body_reject, body_rejecti       text searched for in each decoded part
      filename_reject, mime_reject    attachment name part / MIME type (banned)
      dnsbl, dnsbl_domain             zone[/answer] for the client IP / sender domain
      dnsdcc                          checksum zone (first two letters name the checksum)
      virus_scan                      signature file (see mailfilter/checks/virus.py)
    Ours:
      virus_destiny, banned_destiny, spam_destiny, badh_destiny
                    pass | discard | bounce | reject, per category
                    (defaults as the appliance's setup: bounce, bounce, pass, pass)
      spamassassin  weight of the SpamAssassin score in the sum; 0 (default) asks no spamd
      spam_max_size larger messages are not given to spamd (default 524288)
      allow_banned_in_archives  banned names inside archives are let through (0 or 1)
      subject_tag   put, with a space, before the Subject of spam that is passed
    """

    name: str
    path: Path | None = None
    reject: bool = False
    reject_score: float = 1.0
    mime_strip: tuple[str, ...] = ()
    mime_allow: tuple[str, ...] = ()
    to_cc_check: Scored[bool] = _OFF
    from_check: Scored[bool] = _OFF
    realname_check: Scored[bool] = _OFF
    rdns_required: Scored[bool] = _OFF
    rmx_required: Scored[bool] = _OFF
    header_reject: tuple[Scored[HeaderMatch], ...] = ()
    header_rejecti: tuple[Scored[HeaderMatch], ...] = ()
    body_reject: tuple[Scored[str], ...] = ()
    body_rejecti: tuple[Scored[str], ...] = ()
    filename_reject: tuple[Scored[str], ...] = ()
    mime_reject: tuple[Scored[str], ...] = ()
    dnsbl: tuple[Scored[DnsList], ...] = ()
    dnsbl_domain: tuple[Scored[DnsList], ...] = ()
    dnsdcc: tuple[Scored[str], ...] = ()
    virus_scan: tuple[Scored[Path], ...] = ()
    virus_destiny: str = "bounce"
    banned_destiny: str = "bounce"
    spam_destiny: str = "pass"
    badh_destiny: str = "pass"
    spamassassin: float = 0.0
    spam_max_size: int = 524288
    allow_banned_in_archives: bool = False
    subject_tag: str = ""

    def destiny(self, category: str) -> str:
        """The destiny for a finding category (VIRUS, BANNED, SPAM or BADH)."""
        return {
            "VIRUS": self.virus_destiny,
            "BANNED": self.banned_destiny,
            "SPAM": self.spam_destiny,
            "BADH": self.badh_destiny,
        }[category]


_LIST_FIELDS = {
    "mime_strip",
    "mime_allow",
    "header_reject",
    "header_rejecti",
    "body_reject",
    "body_rejecti",
    "filename_reject",
    "mime_reject",
    "dnsbl",
    "dnsbl_domain",
    "dnsdcc",
    "virus_scan",
}
_FLAGS = {"to_cc_check", "from_check", "realname_check", "rdns_required", "rmx_required"}
_SCORED = _FLAGS | (_LIST_FIELDS - {"mime_strip", "mime_allow"})


class _Reason(ValueError):
    """A value that does not parse; the caller adds file and line."""


def _boolean(value: str) -> bool:
    value = value.strip()
    if value not in ("0", "1"):
        raise _Reason(f"expected 0 or 1, got {value!r}")
    return value == "1"


def _number(value: str, what: str = "a number") -> float:
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        raise _Reason(f"expected {what}, got {value!r}") from None
    if not math.isfinite(number) or not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)", text):
        raise _Reason(f"expected {what}, got {value!r}")
    return number


def _weight(value: str) -> float:
    number = _number(value, "a weight of 0 or more")
    if number < 0:
        raise _Reason(f"expected a weight of 0 or more, got {value!r}")
    return number


def _size(value: str) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise _Reason(f"expected a size in bytes, got {value!r}")
    return int(text)


def _destiny(value: str) -> str:
    text = value.strip().lower()
    if text not in DESTINIES:
        raise _Reason(f"expected one of {', '.join(DESTINIES)}, got {value!r}")
    return text


def _mime_type(value: str) -> str:
    text = value.strip().lower()
    if not _MIME_TYPE.fullmatch(text):
        raise _Reason(f"expected a MIME type, got {value!r}")
    return text


def _text(value: str) -> str:
    if value == "":
        raise _Reason("empty value")
    return value


def _header_match(value: str, *, ignore_case: bool) -> HeaderMatch:
    header, sep, key = value.partition(":")
    if not sep or not _HEADER_NAME.fullmatch(header):
        raise _Reason(f"expected Header:Key, got {value!r}")
    if key == "":
        raise _Reason(f"empty key after {header}:")
    pattern = None
    if len(key) > 2 and key.startswith("/") and key.endswith("/"):
        try:
            pattern = re.compile(key[1:-1], re.IGNORECASE if ignore_case else 0)
        except (re.error, OverflowError, RecursionError) as error:
            # A repeat count over 2**32 raises OverflowError, deep nesting RecursionError.
            reason = str(error) or type(error).__name__
            raise _Reason(f"bad regular expression {key!r}: {reason}") from None
    return HeaderMatch(header=header, key=key, pattern=pattern)


def _dns_list(value: str) -> DnsList:
    zone, sep, answer = value.strip().partition("/")
    if not _ZONE.fullmatch(zone) or "." not in zone.strip("."):
        raise _Reason(f"expected a DNS zone, got {zone!r}")
    address = None
    if sep:
        try:
            address = ipaddress.IPv4Address(answer)
        except ValueError:
            raise _Reason(f"expected an IPv4 answer after '/', got {answer!r}") from None
    return DnsList(zone=zone.rstrip(".").lower(), answer=address)


def _dcc_zone(value: str) -> str:
    zone = _dns_list(value)
    if zone.answer is not None:
        raise _Reason("dnsdcc takes no answer address")
    return zone.zone


def _signature_file(value: str, directory: Path) -> Path:
    name = value.strip()
    if not name:
        raise _Reason("empty signature file name")
    path = Path(name)
    candidates = [path] if path.is_absolute() else [directory / path, BUILTIN_SIGNATURES / path]
    for candidate in candidates:
        try:
            if candidate.is_file():
                return candidate.resolve()
        except OSError as error:
            # A name too long, or a directory the worker's user may not search.
            raise _Reason(f"signature file {name!r}: {error.strerror or error}") from None
    raise _Reason(f"signature file {name!r} not found")


def _parse_value(name: str, value: str, directory: Path):
    if name in ("reject", "allow_banned_in_archives"):
        return _boolean(value)
    if name == "reject_score":
        return _number(value)
    if name in ("mime_strip", "mime_allow", "mime_reject"):
        return _mime_type(value)
    if name in _FLAGS:
        return _boolean(value)
    if name in ("header_reject", "header_rejecti"):
        return _header_match(value, ignore_case=name == "header_rejecti")
    if name in ("body_reject", "body_rejecti", "filename_reject"):
        return _text(value)
    if name in ("dnsbl", "dnsbl_domain"):
        return _dns_list(value)
    if name == "dnsdcc":
        return _dcc_zone(value)
    if name == "virus_scan":
        return _signature_file(value, directory)
    if name.endswith("_destiny"):
        return _destiny(value)
    if name == "spamassassin":
        return _weight(value)
    if name == "spam_max_size":
        return _size(value)
    if name == "subject_tag":
        return value.strip()
    raise AssertionError(name)


_KNOWN = {f.name for f in fields(Profile)} - {"name", "path"}


def _split_score(value: str) -> tuple[float, str]:
    head, sep, rest = value.partition(",")
    if not sep:
        return 1.0, value
    try:
        return _number(head, "a score before the first comma"), rest
    except _Reason:
        raise _Reason(
            f"expected a score before the first comma, got {head!r}"
            " (a value containing a comma needs a score)"
        ) from None


def parse_profile(text: str, *, name: str, path: Path | None = None) -> Profile:
    """Parse the text of one profile file; raises ProfileError naming file and line."""
    where = path if path is not None else Path(name)
    directory = where.parent if path is not None else Path.cwd()
    singles: dict[str, object] = {}
    lists: dict[str, list] = {}
    count = 0
    for number, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.rstrip("\r\n")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        variable, sep, value = line.partition("=")
        variable = variable.strip()
        if not sep or not variable:
            raise ProfileError(where, number, f"expected name=value, got {stripped[:80]!r}")
        if variable not in _KNOWN:
            raise ProfileError(where, number, f"unknown variable {variable!r}")
        if _CONTROL.search(value):
            # A stray CR or NUL could end up in a header the filter writes (subject_tag).
            raise ProfileError(where, number, f"{variable}: control character in the value")
        try:
            if variable in _SCORED:
                score, value = _split_score(value)
                parsed: object = Scored(score, _parse_value(variable, value, directory))
            else:
                parsed = _parse_value(variable, value, directory)
        except _Reason as reason:
            raise ProfileError(where, number, f"{variable}: {reason}") from None
        if variable in _LIST_FIELDS:
            lists.setdefault(variable, []).append(parsed)
        elif variable in singles:
            raise ProfileError(where, number, f"{variable} is set twice")
        else:
            singles[variable] = parsed
        count += 1
    if count == 0:
        raise ProfileError(where, 0, "a profile must set at least one variable")
    values = {**singles, **{key: tuple(items) for key, items in lists.items()}}
    return Profile(name=name, path=path, **values)  # type: ignore[arg-type]


# Far above any profile written by hand; a larger file is something else put there.
MAX_PROFILE_BYTES = 1024 * 1024


def _read_text(path: Path, *, limit: int | None = None) -> str:
    """A regular file's text as UTF-8, without a leading byte order mark (which Windows
    editors write); ProfileError naming the line of the first byte that is not UTF-8.

    Anything but a regular file is refused before it is read: a FIFO, opened without
    O_NONBLOCK, would wait for a writer, and a reload runs on the worker's event loop."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise ProfileError(path, 0, "not a regular file")
            data = stream.read() if limit is None else stream.read(limit + 1)
    except OSError as error:
        raise ProfileError(path, 0, f"cannot read: {error.strerror or error}") from None
    if limit is not None and len(data) > limit:
        raise ProfileError(path, 0, f"larger than {limit} bytes: not a profile")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ProfileError(path, line, "not valid UTF-8") from None
    return text.removeprefix("\ufeff")


def read_profile(path: str | os.PathLike[str]) -> Profile:
    """Read one profile file; its name is the file's name."""
    path = Path(path)
    return parse_profile(_read_text(path, limit=MAX_PROFILE_BYTES), name=path.name, path=path)


def load_profiles(directory: str | os.PathLike[str]) -> dict[str, Profile]:
    """Every profile of a directory by name; raises ProfileError for the first bad one."""
    directory = Path(directory)
    try:
        entries = sorted(directory.iterdir())
    except OSError as error:
        raise ProfileError(directory, 0, f"cannot list: {error.strerror or error}") from None
    profiles = {}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            # A directory FILTER_USER may list but not search (mode 0744) fails here, on
            # a reload after privileges were dropped: a profile error like any other.
            regular = entry.is_file()
        except OSError as error:
            raise ProfileError(entry, 0, f"cannot read: {error.strerror or error}") from None
        if regular:
            profiles[entry.name] = read_profile(entry)
    if not profiles:
        raise ProfileError(directory, 0, "no profile files")
    return profiles


def domain_key(domain: str) -> str | None:
    """A domain as the profile choice compares it: lower case, IDNA 2008 A-labels, no
    final dot; None when it is not a name IDNA allows.

    `bücher.example` and `xn--bcher-kva.example` are one domain: an SMTPUTF8 client names
    it one way, the special-users file may name it the other.
    """
    domain = domain.rstrip(".")
    if domain.isascii():
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True, transitional=False).decode("ascii")
    except UnicodeError:  # idna.IDNAError is one
        return None


def address_key(address: str) -> str:
    """An address as the profile choice compares it: lower case, its domain as
    `domain_key` gives it (or lower-cased, when IDNA refuses it)."""
    address = address.strip().strip("<>")
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    return f"{local.lower()}@{domain_key(domain) or domain.lower()}"


def parse_special_users(
    text: str, *, profiles: Mapping[str, Profile], path: Path | None = None
) -> dict[str, str]:
    """`KEY PROFILE NAME` lines to {address or "@domain", as `address_key` and
    `domain_key` write them: profile name}."""
    where = path or Path("special_users")
    entries: dict[str, str] = {}
    for number, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise ProfileError(where, number, f"expected 'address-or-domain profile', got {line!r}")
        key, profile = parts[0], parts[1].strip()
        if "@" in key[1:]:
            local, _, domain = key.rpartition("@")
            key = address_key(key)
            if not local or not domain.rstrip("."):
                raise ProfileError(where, number, f"bad address {parts[0]!r}")
        else:
            domain = domain_key(key.lstrip("@"))
            if domain is None or not _ZONE.fullmatch(domain):
                raise ProfileError(where, number, f"bad domain {parts[0]!r}")
            key = "@" + domain
        if profile not in profiles:
            raise ProfileError(where, number, f"unknown profile {profile!r}")
        if key in entries:
            raise ProfileError(where, number, f"{parts[0]} is listed twice")
        entries[key] = profile
    return entries


@dataclass(frozen=True)
class _Snapshot:
    profiles: Mapping[str, Profile]
    special: Mapping[str, str]


@dataclass
class ProfileSet:
    """The loaded profiles and the rules that pick one per recipient; reloadable.

    A reload builds a complete new set first and swaps it in with one assignment, so that
    a transaction never sees half of an old and half of a new set, and a set that does not
    load leaves the current one in place.
    """

    directory: Path
    default_profile: str = "Medium"
    relay_profile: str | None = "Relay"
    special_users: Path | None = None
    relay_ips: tuple[str, ...] = ()
    _networks: tuple = field(default=(), init=False, repr=False)
    _snapshot: _Snapshot | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        if self.special_users is not None:
            self.special_users = Path(self.special_users)
        networks = []
        for value in self.relay_ips:
            try:
                networks.append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                raise ValueError(f"relay_ips: {value!r} is not an address or network") from None
        self._networks = tuple(networks)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], **options) -> ProfileSet:
        """Build a set and load it; raises ProfileError when it does not load."""
        profile_set = cls(Path(directory), **options)
        profile_set.reload()
        return profile_set

    def reload(self) -> None:
        """Read everything again; on ProfileError the profiles loaded before stay in use."""
        with self._lock:
            profiles = load_profiles(self.directory)
            for option, wanted in (
                ("default_profile", self.default_profile),
                ("relay_profile", self.relay_profile),
            ):
                if wanted is not None and wanted not in profiles:
                    raise ProfileError(self.directory, 0, f"{option} {wanted!r} is not a profile")
            special: dict[str, str] = {}
            if self.special_users is not None:
                text = _read_text(self.special_users)
                special = parse_special_users(text, profiles=profiles, path=self.special_users)
            self._snapshot = _Snapshot(profiles=profiles, special=special)

    @property
    def profiles(self) -> Mapping[str, Profile]:
        return self._current().profiles

    def __getitem__(self, name: str) -> Profile:
        return self._current().profiles[name]

    def choose_profile(
        self, recipient: str, *, client_ip: str | None = None, authenticated: bool = False
    ) -> Profile:
        """The profile for one envelope recipient of a transaction from `client_ip`."""
        snapshot = self._current()
        if self.relay_profile is not None and (authenticated or self._relayed(client_ip)):
            return snapshot.profiles[self.relay_profile]
        address = address_key(recipient)
        name = snapshot.special.get(address)
        if name is None and "@" in address:
            name = snapshot.special.get("@" + address.rpartition("@")[2])
        return snapshot.profiles[name or self.default_profile]

    def signature_files(self) -> set[Path]:
        """Every signature file some profile names (for the virus scanner to load)."""
        return {
            rule.value for profile in self.profiles.values() for rule in profile.virus_scan
        }

    def _relayed(self, client_ip: str | None) -> bool:
        if not client_ip or not self._networks:
            return False
        try:
            address = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def _current(self) -> _Snapshot:
        if self._snapshot is None:
            raise RuntimeError("ProfileSet used before a successful load")
        return self._snapshot
