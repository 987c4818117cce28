"""The setup wizard behind `manage.py configure`: the appliance's questions, their
answers checked, and the result written to the `.env` file and the default profile.

The questions and their defaults are the appliance's (destinies, spam level, banned names
inside archives, spamd's size limit, the quarantine's size, the web viewer, Exchange
integration, relay domains, the server that takes final delivery). Previous answers are
read back from the same two files, so that running the wizard again offers them as
defaults. Every answer can also come from a command-line flag; without a terminal
(`--no-input`) an answer that is missing or that does not parse is an error naming the
flag.

Where each answer goes:
- the four destinies, the spam level (`reject_score`), `allow_banned_in_archives` and
  `spam_max_size` go to the default profile (FILTER_DEFAULT_PROFILE in PROFILE_DIR); the
  file's other lines are kept;
- everything else goes to `.env` (QUARANTINE_MAX_SIZE_MB, WEB_VIEWER, LOGIN_METHOD, the
  LDAP_* settings, RELAY_DOMAINS, RELAY_NEXT_HOP); its other lines and comments are kept.

Both files are replaced atomically (a temporary file in the same directory, fsynced, then
renamed), so a crash leaves the old file or the new one, never half of each. The `.env`
file gets mode 0600 because it holds the directory password.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from spamviewer.durable import fsync_directory

DESTINIES = ("pass", "bounce", "discard", "reject")
YES = ("y", "yes", "true", "1")
NO = ("n", "no", "false", "0")
# The profile variables the wizard owns; every other line of the profile file is kept.
PROFILE_VARIABLES = (
    "spam_destiny",
    "virus_destiny",
    "banned_destiny",
    "badh_destiny",
    "reject_score",
    "allow_banned_in_archives",
    "spam_max_size",
)
DEFAULT_PROFILE = "Medium"

_DOMAIN = re.compile(
    r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.,:/@+\-\[\]]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class InvalidAnswer(ValueError):
    """An answer that cannot be used; the message says why."""


class WizardError(Exception):
    """The wizard cannot go on (a bad or missing flag without a terminal, a failed test)."""


# Parsing answers -------------------------------------------------------------------------


def parse_destiny(text: str) -> str:
    value = text.strip().lower()
    if value.startswith("d_"):
        value = value[2:]
    if value not in DESTINIES:
        raise InvalidAnswer(
            f"{text.strip()!r} is not a destiny: answer pass, bounce, discard or reject "
            "(or D_PASS, D_BOUNCE, D_DISCARD, D_REJECT)"
        )
    return value


def parse_yes_no(text: str) -> bool:
    value = text.strip().lower()
    if value in YES:
        return True
    if value in NO:
        return False
    raise InvalidAnswer(f"{text.strip()!r}: answer yes or no")


def parse_spam_level(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise InvalidAnswer(f"{text.strip()!r} is not a number (for example 6.31)") from None
    if not math.isfinite(value) or value < 0.01:
        raise InvalidAnswer(f"{text.strip()!r}: the spam level must be a number above 0 "
                            "(at least 0.01)")
    return round(value, 4)


def _whole_number(text: str, *, minimum: int, what: str) -> int:
    value = text.strip()
    if not value.isdigit():
        raise InvalidAnswer(f"{value!r} is not a whole number of {what}")
    number = int(value)
    if number < minimum:
        raise InvalidAnswer(f"{number}: must be at least {minimum}")
    return number


def parse_spam_max_size(text: str) -> int:
    return _whole_number(text, minimum=1024, what="bytes")


def parse_quarantine_mb(text: str) -> int:
    return _whole_number(text, minimum=0, what="megabytes (0 = no limit)")


def parse_ldap_server(text: str) -> str:
    value = text.strip()
    if not value:
        raise InvalidAnswer("the directory server is needed for Exchange integration")
    if _CONTROL.search(value) or " " in value:
        raise InvalidAnswer(f"{value!r}: a server address has no spaces")
    from directory.ldap import DirectoryError, validate_server

    try:
        validate_server(value)
    except DirectoryError as exc:
        raise InvalidAnswer(f"{value!r}: {exc.reason}") from None
    return value


def parse_bind_dn(text: str) -> str:
    value = text.strip()
    if not value:
        raise InvalidAnswer(
            "the sync account is needed: a DN, user@domain or DOMAIN\\user"
        )
    if _CONTROL.search(value):
        raise InvalidAnswer("the account name contains a control character")
    return value


def parse_password(text: str) -> str:
    value = text.rstrip("\r\n")
    if not value:
        raise InvalidAnswer("the password of the sync account is needed")
    if _CONTROL.search(value):
        raise InvalidAnswer("the password contains a control character")
    return value


def parse_base_dn(text: str) -> str:
    import ldap.dn

    value = text.strip()
    if not value:
        raise InvalidAnswer('the base DN is needed, for example "DC=company,DC=local"')
    parts = [part.strip() for part in value.split(";") if part.strip()]
    for part in parts:
        if not ldap.dn.is_dn(part) or "=" not in part:
            raise InvalidAnswer(f"{part!r} is not a DN (for example CN=Users,DC=company,DC=local)")
    return ";".join(parts)


def parse_domains(text: str) -> tuple[str, ...]:
    domains: list[str] = []
    for item in re.split(r"[,\s]+", text.strip()):
        domain = item.strip().lower().rstrip(".")
        if not domain:
            continue
        if not _DOMAIN.fullmatch(domain) or "." not in domain:
            raise InvalidAnswer(f"{item!r} is not a domain name (for example company.com)")
        if domain not in domains:
            domains.append(domain)
    if not domains:
        raise InvalidAnswer("at least one domain is needed (comma-separated)")
    return tuple(domains)


def parse_next_hop(text: str) -> str:
    """`host`, `host:port`, `[address]` or `[address]:port` (Postfix's notation)."""
    value = text.strip()
    if not value:
        raise InvalidAnswer("the mail server that takes final delivery is needed")
    host, port = value, ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise InvalidAnswer(f"{value!r}: a missing ']'")
        host, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            raise InvalidAnswer(f"{value!r}: expected [address]:port")
        port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise InvalidAnswer(f"{value!r}: the port must be a number from 1 to 65535")
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _DOMAIN.fullmatch(host.lower().rstrip(".")):
            raise InvalidAnswer(f"{value!r}: expected a host name or address, with :port "
                                "if it is not 25") from None
    return value


def _show_bool(value: bool) -> str:
    return "yes" if value else "no"


def _show_level(value: float) -> str:
    # Plain decimals (never 1e+20): the profile parser reads no exponents.
    return f"{value:.4f}".rstrip("0").rstrip(".")


# The questions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    key: str
    flag: str
    prompt: str
    label: str
    parse: Callable[[str], Any]
    show: Callable[[Any], str] = str
    secret: bool = False
    help: str = ""


DESTINY_HELP = (
    "For the destinies: pass delivers the message (spam gets X-Spam-* headers), bounce "
    "quarantines it and refuses it so that the sending side bounces it, discard "
    "quarantines it without telling the sender, reject refuses it and keeps nothing."
)

FILTER_QUESTIONS = (
    Question("spam_destiny", "--spam-destiny",
             "Spam message destiny (pass, bounce, discard or reject). It is safest to pass "
             "spam and let the clients filter on X-Spam-Status", "Spam destiny",
             parse_destiny, help=DESTINY_HELP),
    Question("virus_destiny", "--virus-destiny",
             "Virus message destiny. bounce or discard keeps infected messages away from "
             "the clients", "Virus destiny", parse_destiny),
    Question("banned_destiny", "--banned-destiny",
             "Banned attachment message destiny. bounce or discard keeps disallowed "
             "attachments (.exe) away from the clients", "Banned destiny", parse_destiny),
    Question("badh_destiny", "--badh-destiny",
             "Bad header message destiny. Keep pass if delivering a message with a "
             "malformed header is OK", "Bad header destiny", parse_destiny),
    Question("spam_level", "--spam-level",
             "Spam level: the score at which a message is spam", "Spam level",
             parse_spam_level, _show_level),
    Question("allow_banned_in_archives", "--allow-banned-in-archives",
             "Allow banned attachments if they are inside an archive (zip, gz, bz2, tar, "
             "tgz, tbz)? (yes/no)", "Allow banned inside archives", parse_yes_no, _show_bool),
    Question("spam_max_size", "--spam-max-size",
             "Maximum message size scanned for spam, in bytes (larger messages are "
             "scanned for viruses only)", "Max message size to scan for spam",
             parse_spam_max_size),
    Question("quarantine_max_size_mb", "--quarantine-max-size-mb",
             "Maximum size of the quarantine in MB; the oldest messages are deleted "
             "beyond it (0 = no limit)", "Quarantine size limit (MB)", parse_quarantine_mb),
    Question("web_viewer", "--web-viewer",
             "Enable the web viewer for quarantined messages? (yes/no)",
             "Use web quarantine viewer", parse_yes_no, _show_bool),
    Question("exchange", "--exchange",
             "Use Exchange (Active Directory) recipient integration? It builds the allowed "
             "recipients map from the directory and, with the web viewer, lets users log "
             "in with their Exchange address and password (yes/no)", "Use Exchange",
             parse_yes_no, _show_bool),
)

LDAP_QUESTIONS = (
    Question("ldap_server", "--ldap-server",
             "Active Directory server (host, host:port, ldap://host or ldaps://host)",
             "Exchange server", parse_ldap_server),
    Question("ldap_bind_dn", "--ldap-bind-dn",
             "Account to connect with (a DN, user@domain or DOMAIN\\user; read access "
             "only, never a privileged account)", "Active Directory user", parse_bind_dn),
    Question("ldap_bind_password", "--ldap-bind-password-file",
             "Password of that account", "Active Directory password", parse_password,
             lambda _: "********", secret=True),
    Question("ldap_base_dn", "--ldap-base-dn",
             'Base DN of the topmost container to scan, e.g. "DC=company,DC=local" '
             '(several separated by ";")', "Active Directory base DN", parse_base_dn),
    Question("ldap_allow_insecure", "--ldap-allow-insecure",
             "Allow a plain (unencrypted) connection when TLS fails? (yes/no)",
             "Allow insecure LDAP", parse_yes_no, _show_bool),
)

RELAY_QUESTIONS = (
    Question("relay_domains", "--relay-domains",
             "Domains this server receives mail for (comma-separated)", "Relay domains",
             parse_domains, lambda value: ", ".join(value)),
    Question("next_hop", "--next-hop",
             "Mail server that takes final delivery after filtering (host, or host:port)",
             "Destination mail server", parse_next_hop),
)

QUESTIONS = FILTER_QUESTIONS + LDAP_QUESTIONS + RELAY_QUESTIONS
QUESTIONS_BY_KEY = {q.key: q for q in QUESTIONS}

# The appliance's defaults; relay domains, the next hop and the directory have none.
APPLIANCE_DEFAULTS: dict[str, Any] = {
    "spam_destiny": "pass",
    "virus_destiny": "bounce",
    "banned_destiny": "bounce",
    "badh_destiny": "pass",
    "spam_level": 6.31,
    "allow_banned_in_archives": False,
    "spam_max_size": 524288,
    "quarantine_max_size_mb": 500,
    "web_viewer": True,
    "exchange": True,
    "ldap_allow_insecure": True,
}


# `.env` settings the wizard writes that the settings read with env_secret, i.e. that may
# also come from NAME_FILE, which then takes precedence.
SECRET_ENV_NAMES = frozenset({"LDAP_BIND_PASSWORD"})


@dataclass
class Answers:
    spam_destiny: str
    virus_destiny: str
    banned_destiny: str
    badh_destiny: str
    spam_level: float
    allow_banned_in_archives: bool
    spam_max_size: int
    quarantine_max_size_mb: int
    web_viewer: bool
    exchange: bool
    relay_domains: tuple[str, ...]
    next_hop: str
    ldap_server: str = ""
    ldap_bind_dn: str = ""
    ldap_bind_password: str = field(default="", repr=False)
    ldap_base_dn: str = ""
    ldap_allow_insecure: bool = True

    def questions(self) -> tuple[Question, ...]:
        return FILTER_QUESTIONS + (LDAP_QUESTIONS if self.exchange else ()) + RELAY_QUESTIONS

    def review(self) -> str:
        lines = ["Review:"]
        for question in self.questions():
            lines.append(f"  {question.label}: {question.show(getattr(self, question.key))}")
        return "\n".join(lines)

    def env_values(self) -> dict[str, str]:
        """The `.env` settings; with Exchange off the directory server and password are
        emptied (the other LDAP_* lines stay, as defaults for a later run). Writing the
        password also removes LDAP_BIND_PASSWORD_FILE (see update_env_text)."""
        values = {
            "QUARANTINE_MAX_SIZE_MB": str(self.quarantine_max_size_mb),
            "WEB_VIEWER": str(self.web_viewer),
            "LOGIN_METHOD": "ldap" if self.exchange and self.web_viewer else "local",
            "RELAY_DOMAINS": ",".join(self.relay_domains),
            "RELAY_NEXT_HOP": self.next_hop,
        }
        if self.exchange:
            values.update(
                LDAP_SERVER=self.ldap_server,
                LDAP_BIND_DN=self.ldap_bind_dn,
                LDAP_BIND_PASSWORD=self.ldap_bind_password,
                LDAP_BASE_DN=self.ldap_base_dn,
                LDAP_ALLOW_INSECURE=str(self.ldap_allow_insecure),
            )
        else:
            values.update(LDAP_SERVER="", LDAP_BIND_PASSWORD="")
        return values

    def profile_values(self) -> dict[str, str]:
        return {
            "spam_destiny": self.spam_destiny,
            "virus_destiny": self.virus_destiny,
            "banned_destiny": self.banned_destiny,
            "badh_destiny": self.badh_destiny,
            "reject_score": _show_level(self.spam_level),
            "allow_banned_in_archives": "1" if self.allow_banned_in_archives else "0",
            "spam_max_size": str(self.spam_max_size),
        }


# Where the answers live ----------------------------------------------------------------------


@dataclass(frozen=True)
class Locations:
    env_file: Path
    profile_dir: Path
    profile_name: str
    # Write PROFILE_DIR to .env (it was not set, or --profile-dir named another one).
    set_profile_dir: bool = False
    # A profile directory that does not exist yet starts as a copy of these examples (the
    # filter needs the relay profile too, not only the default one).
    examples: Path | None = None

    @property
    def profile_file(self) -> Path:
        return self.profile_dir / self.profile_name


def locate(
    *,
    env_file: Path,
    base_dir: Path,
    var_dir: Path,
    profile_dir: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Locations:
    """The `.env` file and the default profile's file.

    PROFILE_DIR and FILTER_DEFAULT_PROFILE are looked for in `--profile-dir`, the `.env`
    file, then the environment. With no profile directory at all the filter uses a
    built-in profile, which the wizard cannot change: it then uses `var/profiles` (made
    from the shipped examples) and points PROFILE_DIR at it.
    """
    environ = os.environ if environ is None else environ
    current = read_env_file(env_file)

    def lookup(name: str) -> str:
        return (current.get(name) or environ.get(name) or "").strip()

    name = lookup("FILTER_DEFAULT_PROFILE") or DEFAULT_PROFILE
    if "/" in name or name.startswith("."):
        raise WizardError(f"FILTER_DEFAULT_PROFILE={name!r} is not a profile file name")
    given = (profile_dir or "").strip()
    chosen = given or lookup("PROFILE_DIR")
    if chosen:
        path = Path(chosen)
        directory = path if path.is_absolute() else base_dir / path
    else:
        directory = var_dir / "profiles"
    return Locations(env_file, directory, name, set_profile_dir=bool(given) or not chosen,
                     examples=base_dir / "profiles")


def read_env_file(path: Path) -> dict[str, str]:
    """The settings of a `.env` file as python-dotenv reads them (no interpolation)."""
    from dotenv import dotenv_values

    if not path.exists():
        return {}
    return {k: v for k, v in dotenv_values(path, interpolate=False).items() if v is not None}


def read_profile_values(path: Path) -> dict[str, str]:
    """The wizard's variables as written in a profile file (raw text, first line wins)."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return values
    for line in text.split("\n"):
        name, sep, value = line.partition("=")
        name = name.strip()
        if sep and name in PROFILE_VARIABLES and not name.startswith("#"):
            values.setdefault(name, value.strip())
    return values


def previous_answers(locations: Locations) -> dict[str, Any]:
    """The answers found in the `.env` file and the profile, for use as defaults; a value
    that no longer parses is left out (the appliance's default is offered instead)."""
    env = read_env_file(locations.env_file)
    profile = read_profile_values(locations.profile_file)
    raw: dict[str, str] = {}
    for key in ("spam_destiny", "virus_destiny", "banned_destiny", "badh_destiny",
                "spam_max_size"):
        if key in profile:
            raw[key] = profile[key]
    if "reject_score" in profile:
        raw["spam_level"] = profile["reject_score"]
    if "allow_banned_in_archives" in profile:
        raw["allow_banned_in_archives"] = profile["allow_banned_in_archives"]
    for key, name in (
        ("quarantine_max_size_mb", "QUARANTINE_MAX_SIZE_MB"),
        ("web_viewer", "WEB_VIEWER"),
        ("ldap_server", "LDAP_SERVER"),
        ("ldap_bind_dn", "LDAP_BIND_DN"),
        ("ldap_bind_password", "LDAP_BIND_PASSWORD"),
        ("ldap_base_dn", "LDAP_BASE_DN"),
        ("ldap_allow_insecure", "LDAP_ALLOW_INSECURE"),
        ("relay_domains", "RELAY_DOMAINS"),
        ("next_hop", "RELAY_NEXT_HOP"),
    ):
        if env.get(name, "").strip():
            raw[key] = env[name]
    password_file = env.get("LDAP_BIND_PASSWORD_FILE", "").strip()
    if password_file:
        # The settings prefer the file, so its password is the one in use.
        try:
            raw["ldap_bind_password"] = Path(password_file).read_text().strip()
        except (OSError, UnicodeDecodeError):
            raw.pop("ldap_bind_password", None)
    if "LDAP_SERVER" in env:
        # Present but empty: Exchange integration was turned off.
        raw["exchange"] = "yes" if env["LDAP_SERVER"].strip() else "no"
    found: dict[str, Any] = {}
    for key, text in raw.items():
        try:
            found[key] = QUESTIONS_BY_KEY[key].parse(text)
        except InvalidAnswer:
            continue
    return found


# Writing ---------------------------------------------------------------------------------------


def _quote_env(value: str) -> str:
    """A value python-dotenv reads back unchanged: plain when it is simple, otherwise in
    single quotes (no variable expansion there) with backslash and quote escaped."""
    if _PLAIN_VALUE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def update_env_text(text: str, values: Mapping[str, str]) -> str:
    """`text` with each setting of `values` set: its first line replaced, later lines for
    the same name dropped, missing names added at the end. Other lines stay as they are,
    except that setting a secret (SECRET_ENV_NAMES) removes its NAME_FILE lines: the
    settings prefer the file, which would otherwise keep the old secret in use. A secret
    equal to what its NAME_FILE holds is not written: the file stays in charge."""

    def name_of(line: str) -> str | None:
        match = _ENV_LINE.match(line)
        return match.group(1) if match else None

    values = dict(values)
    files = {}
    for line in text.splitlines():
        name = name_of(line)
        if name is not None and name.endswith("_FILE"):
            files[name] = line.split("=", 1)[1].strip().strip("'\"")
    for name in [n for n in values if n in SECRET_ENV_NAMES and f"{n}_FILE" in files]:
        try:
            unchanged = Path(files[f"{name}_FILE"]).read_text().strip() == values[name]
        except (OSError, UnicodeDecodeError):
            unchanged = False
        if unchanged:
            # The secret stays in its file (a mounted secret, say): not copied into .env.
            del values[name]
    drop = {f"{name}_FILE" for name in values if name in SECRET_ENV_NAMES}
    return _set_lines(text, values, name_of, lambda name, value: f"{name}={_quote_env(value)}",
                      drop=drop)


def update_profile_text(text: str, values: Mapping[str, str]) -> str:
    """The same for a profile file: the wizard's variables set, every other line kept."""

    def name_of(line: str) -> str | None:
        name, sep, _ = line.partition("=")
        return name.strip() if sep else None

    return _set_lines(text, values, name_of, lambda name, value: f"{name}={value}")


def _set_lines(
    text: str,
    values: Mapping[str, str],
    name_of: Callable[[str], str | None],
    render: Callable[[str, str], str],
    *,
    drop: Collection[str] = (),
) -> str:
    """`text` with the settings of `values` set and every line setting a name in `drop`
    removed."""
    seen: set[str] = set()
    out: list[str] = []
    for line in text.splitlines():
        name = name_of(line)
        if name is not None and name in drop and name not in values:
            continue
        if name in values:
            if name not in seen:
                out.append(render(name, values[name]))
                seen.add(name)
            continue
        out.append(line)
    missing = [name for name in values if name not in seen]
    if missing:
        if out and out[-1].strip():
            out.append("")
        out.append("# Written by manage.py configure")
        out += [render(name, values[name]) for name in missing]
    return "\n".join(out) + "\n"


def write_atomically(path: Path, text: str, *, mode: int) -> None:
    """Replace `path` with `text`: a temporary file in the same directory (its name starts
    with a dot, so a profile reload skips it), fsynced, renamed over `path`, and the
    directory fsynced. An existing file's owner is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600: the secret is never readable by others, not even
        # for the moment before the rename.
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if old is not None and os.geteuid() == 0:
                os.fchown(handle.fileno(), old.st_uid, old.st_gid)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(path.parent)


def _read_text(path: Path) -> str:
    """The file's text; a byte order mark at its start (Windows editors write one) is
    dropped, as the worker drops it, and not written back."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return ""


def save(answers: Answers, locations: Locations) -> None:
    """Write the profile first, then `.env` (which may point PROFILE_DIR at it)."""
    from mailfilter.profiles import ProfileError, parse_profile

    profile_file = locations.profile_file
    if locations.examples is not None and not locations.profile_dir.exists():
        shutil.copytree(locations.examples, locations.profile_dir)
    text = update_profile_text(_read_text(profile_file), answers.profile_values())
    try:
        parse_profile(text, name=locations.profile_name, path=profile_file)
    except ProfileError as exc:
        raise WizardError(f"the profile would not load, nothing written: {exc}") from None
    try:
        profile_mode = profile_file.stat().st_mode & 0o777
    except FileNotFoundError:
        profile_mode = 0o644
    write_atomically(profile_file, text, mode=profile_mode)
    env = answers.env_values()
    if locations.set_profile_dir:
        env["PROFILE_DIR"] = str(locations.profile_dir)
    write_atomically(
        locations.env_file, update_env_text(_read_text(locations.env_file), env), mode=0o600
    )


# Testing the directory -------------------------------------------------------------------------


def check_directory(values: Mapping[str, Any], *, ca_file: str = "", timeout: int = 10
                    ) -> str | None:
    """Connect and bind as the sync account and look at each base DN, with the answers to
    the LDAP questions in `values`; None when all worked, else what failed."""
    import ldap

    from directory.ldap import (
        BaseDNNotFound,
        DirectoryConfig,
        DirectoryCredentialsError,
        DirectoryError,
        DirectoryNotConfigured,
        DirectoryTLSError,
        DirectoryUnreachable,
        connect,
    )

    server, bind_dn = values["ldap_server"], values["ldap_bind_dn"]
    base_dns = tuple(dn for dn in values["ldap_base_dn"].split(";") if dn)
    config = DirectoryConfig(
        server=server, bind_dn=bind_dn, bind_password=values["ldap_bind_password"],
        base_dns=base_dns, ca_file=ca_file, allow_insecure=values["ldap_allow_insecure"],
        timeout=timeout,
    )
    base = ""
    try:
        with connect(config) as conn:
            for base in base_dns:
                # A base-scope search: one entry at most, and noSuchObject when it is absent.
                for _ in conn.paged_search(base, "(objectClass=*)", ["1.1"],
                                           scope=ldap.SCOPE_BASE):
                    break
    except DirectoryUnreachable as exc:
        return f"cannot contact the directory server {server}: {exc.reason}"
    except DirectoryTLSError as exc:
        return (f"the TLS connection to {server} failed: {exc.reason}. Set "
                "LDAP_CA_FILE to the CA that signed the server's certificate, or allow "
                "insecure connections")
    except DirectoryCredentialsError:
        return (f"the server refused the credentials of {bind_dn}: check the "
                "account name and the password")
    except BaseDNNotFound:
        return f"the base DN {base} does not exist on {server}"
    except DirectoryNotConfigured as exc:
        return f"the server address cannot be used: {exc.reason}"
    except DirectoryError as exc:
        return f"the directory refused the test: {exc}"
    return None


# The conversation ----------------------------------------------------------------------------


class Terminal(Protocol):
    def say(self, text: str) -> None: ...

    def ask(self, prompt: str) -> str | None:
        """One line typed by the user, None at end of input."""

    def ask_secret(self, prompt: str) -> str | None: ...


_NOT_GIVEN = object()


class Wizard:
    """Asks the questions (or takes the flags), then shows the review.

    `given` holds the flags' raw text by question key; `interactive` False means no
    questions at all: every answer comes from a flag, the previous answer or the
    appliance's default. `test_directory` returns what failed, or None.
    """

    def __init__(
        self,
        terminal: Terminal,
        *,
        given: Mapping[str, str],
        previous: Mapping[str, Any],
        interactive: bool,
        test_directory: Callable[[Mapping[str, Any]], str | None] | None,
    ) -> None:
        self.terminal = terminal
        self.given = dict(given)
        self.defaults = {**APPLIANCE_DEFAULTS, **previous}
        self.interactive = interactive
        self.test_directory = test_directory
        for key, text in self.given.items():
            try:
                QUESTIONS_BY_KEY[key].parse(text)
            except InvalidAnswer as exc:
                raise WizardError(f"{QUESTIONS_BY_KEY[key].flag}: {exc}") from None

    def run(self) -> Answers:
        """The confirmed answers (WizardError at the end of input)."""
        while True:
            values: dict[str, Any] = {}
            for question in FILTER_QUESTIONS:
                values[question.key] = self._answer(question)
            if values["exchange"]:
                values.update(self._directory())
            for question in RELAY_QUESTIONS:
                values[question.key] = self._answer(question)
            answers = Answers(**values)
            self.terminal.say(answers.review())
            if not self.interactive:
                return answers
            if self._yes_no("Configuration OK? (Yes/No)", "Yes"):
                return answers
            # Start over, offering what was just answered.
            self.defaults.update(values)
            self.given.clear()

    def _directory(self) -> dict[str, Any]:
        while True:
            values = {q.key: self._answer(q) for q in LDAP_QUESTIONS}
            if self.test_directory is None:
                return values
            self.terminal.say(f"Testing the connection to {values['ldap_server']}...")
            problem = self.test_directory(values)
            if problem is None:
                self.terminal.say("The directory answered: server, TLS, account and base DN "
                                  "are fine.")
                return values
            self.terminal.say(f"Exchange integration test failed: {problem}.")
            if not self.interactive:
                raise WizardError(
                    f"Exchange integration test failed: {problem} "
                    "(--skip-ldap-test keeps the answers without testing)"
                )
            if self._yes_no("Keep these answers anyway? (Yes/No)", "No"):
                return values
            self.defaults.update(values)
            for question in LDAP_QUESTIONS:
                self.given.pop(question.key, None)

    def _answer(self, question: Question) -> Any:
        if question.key in self.given:
            return question.parse(self.given[question.key])
        default = self.defaults.get(question.key, _NOT_GIVEN)
        if not self.interactive:
            if default is _NOT_GIVEN:
                raise WizardError(f"{question.flag} is missing: {question.label} has no "
                                  "default (and --no-input asks nothing)")
            return default
        if question.help:
            self.terminal.say(question.help)
        if default is _NOT_GIVEN:
            shown = ""
        elif question.secret:
            shown = "[keep the current one]"
        else:
            shown = f"[{question.show(default)}]"
        prompt = f"{question.prompt} {shown}: " if shown else f"{question.prompt}: "
        while True:
            if question.secret:
                text = self.terminal.ask_secret(prompt)
            else:
                text = self.terminal.ask(prompt)
            if text is None:
                raise WizardError(f"end of input before {question.label} was answered")
            if (text.strip() if not question.secret else text) == "" and (
                default is not _NOT_GIVEN
            ):
                return default
            try:
                return question.parse(text)
            except InvalidAnswer as exc:
                self.terminal.say(f"  {exc}. Please answer again.")

    def _yes_no(self, prompt: str, default: str) -> bool:
        while True:
            text = self.terminal.ask(f"{prompt} [{default}]: ")
            if text is None:
                raise WizardError("end of input before the question was answered")
            try:
                return parse_yes_no(text if text.strip() else default)
            except InvalidAnswer as exc:
                self.terminal.say(f"  {exc}. Please answer again.")
