"""The quarantine store: amavisd-new compatible quarantine files on a filesystem.

A file is the original message with a block of envelope header fields put in front of it
(Return-Path, Delivered-To, X-Envelope-From, X-Envelope-To, X-Envelope-To-Blocked,
X-Quarantine-ID, then X-Amavis-*/X-Spam-* findings), lines ending in LF. The file name is
`<category prefix>-<mail_id>`, with `.gz` for a gzip stream (spam by default), in a
sub-directory named by the first character of the mail_id when subdir levels is 1.

Everything that touches the files goes through `FileStore`, so that another backend (an
object store) can replace it behind the same methods.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from spamviewer.durable import fsync_directory

log = logging.getLogger(__name__)

# Category of a quarantine file, by the prefix of its name (amavisd-new's defaults) and by
# the quarantine pseudo-recipient in its Delivered-To field.
PREFIX_BY_CATEGORY = {"VIRUS": "virus", "BANNED": "banned", "SPAM": "spam", "BADH": "badh"}
CATEGORY_BY_PREFIX = {prefix: cat for cat, prefix in PREFIX_BY_CATEGORY.items()}
CATEGORY_BY_DELIVERED_TO = {
    "virus-quarantine": "VIRUS",
    "banned-quarantine": "BANNED",
    "spam-quarantine": "SPAM",
    "bad-header-quarantine": "BADH",
}
DELIVERED_TO_BY_CATEGORY = {cat: name for name, cat in CATEGORY_BY_DELIVERED_TO.items()}

MAIL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+-]{6,30}[A-Za-z0-9]$")
_FILE_NAME_RE = re.compile(
    r"^(?P<prefix>[a-z]+)-(?P<mail_id>[A-Za-z0-9][A-Za-z0-9_+-]*?)(?P<gz>\.gz)?$"
)

# Fields amavisd-new puts in front of the message; release skips them (amavisd's own rule).
_ENVELOPE_FIELD_RE = re.compile(
    rb"^(return-path|delivered-to|x-envelope-from|x-envelope-to|x-envelope-to-blocked"
    rb"|x-quarantine-id|x-amavis-(hold|alert|modified|penpals|policybank|os-fingerprint)"
    rb"|x-spam-[a-z0-9-]+|x-crm114-[a-z0-9-]+)$",
    re.IGNORECASE,
)

# A quarantine file is our own output, but a directory being indexed may hold anything:
# a gzip stream is never inflated beyond this.
MAX_FILE_BYTES = 256 * 1024 * 1024


class StoreError(Exception):
    """A store operation failed; the message names the file and the reason."""


@dataclass
class QuarantineFile:
    """A quarantine file split into its envelope block and the original message."""

    fields: list[tuple[str, str]]
    message: bytes
    raw_size: int = 0
    _by_name: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name, value in self.fields:
            self._by_name.setdefault(name.lower(), []).append(value)

    def first(self, name: str) -> str | None:
        values = self._by_name.get(name.lower())
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return list(self._by_name.get(name.lower(), []))

    @property
    def mail_id(self) -> str | None:
        value = self.first("X-Quarantine-ID")
        return value.strip().strip("<>").strip() if value else None

    @property
    def sender(self) -> str:
        value = self.first("X-Envelope-From")
        if value is None:
            value = self.first("Return-Path") or ""
        return _strip_brackets(value)

    @property
    def recipients(self) -> list[str]:
        return split_addresses(",".join(self.all("X-Envelope-To")))

    @property
    def blocked_recipients(self) -> list[str]:
        """The recipients whose mail was held; all recipients where the field is absent."""
        if self.first("X-Envelope-To-Blocked") is None:
            return self.recipients
        blocked = split_addresses(",".join(self.all("X-Envelope-To-Blocked")))
        return blocked or self.recipients

    @property
    def category(self) -> str | None:
        value = (self.first("Delivered-To") or "").strip().lower()
        return CATEGORY_BY_DELIVERED_TO.get(value)


def split_addresses(value: str) -> list[str]:
    """`<a@x>, <b@y>` (folded or not) to `["a@x", "b@y"]`; an empty `<>` is dropped. Within
    angle brackets a comma is part of the address (`<"smith,john"@x>`); a list without
    brackets is split at its commas."""
    out = []
    for bracketed, bare in _ADDRESS_ITEM.findall(value):
        addr = (bracketed or bare).strip()
        if addr:
            out.append(addr)
    return out


# One address of a list: in angle brackets (commas inside belong to it) or bare.
_ADDRESS_ITEM = re.compile(r"<([^<>]*)>|([^,<>]+)")


def _strip_brackets(value: str) -> str:
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value


def parse_quarantine_file(data: bytes) -> QuarantineFile:
    """Split a quarantine file at the first header field that amavisd-new did not prepend.

    The original message is everything from that field on (amavisd's own Received line
    included, as its release does).
    """
    fields: list[tuple[str, str]] = []
    pos = 0
    length = len(data)
    while pos < length:
        end = data.find(b"\n", pos)
        if end < 0:
            break
        line = data[pos:end].rstrip(b"\r")
        colon = line.find(b":")
        if colon <= 0 or not _ENVELOPE_FIELD_RE.match(line[:colon].strip()):
            break
        name = line[:colon].strip().decode("ascii", "replace")
        value_parts = [line[colon + 1 :].strip()]
        nxt = end + 1
        # Continuation lines start with a space or a tab.
        while nxt < length and data[nxt : nxt + 1] in (b" ", b"\t"):
            cend = data.find(b"\n", nxt)
            if cend < 0:
                cend = length
            value_parts.append(data[nxt:cend].rstrip(b"\r").strip())
            nxt = cend + 1
        value = b" ".join(p for p in value_parts if p).decode("utf-8", "replace")
        fields.append((name, value))
        pos = nxt
    return QuarantineFile(fields=fields, message=data[pos:], raw_size=len(data))


def generate_mail_id() -> tuple[str, str]:
    """A new (mail_id, secret_id) pair made as amavisd-new makes them.

    72 random bits; secret_id is their base64url form, mail_id the first 12 characters of
    the base64url MD5 of them, starting and ending with a letter or digit.
    """
    while True:
        secret_bin = secrets.token_bytes(9)
        digest = hashlib.md5(secret_bin, usedforsecurity=False).digest()
        mail_id = base64.urlsafe_b64encode(digest).decode("ascii")[:12]
        if mail_id[0].isalnum() and mail_id[-1].isalnum():
            secret_id = base64.urlsafe_b64encode(secret_bin).decode("ascii")
            return mail_id, secret_id


def name_info(file_name: str) -> tuple[str | None, str | None, bool]:
    """(category, mail_id, gzipped) from a quarantine file name such as `spam-abc.gz`."""
    match = _FILE_NAME_RE.match(file_name)
    if not match:
        return None, None, file_name.endswith(".gz")
    return (
        CATEGORY_BY_PREFIX.get(match.group("prefix")),
        match.group("mail_id"),
        bool(match.group("gz")),
    )


def _fold_addresses(name: str, addresses: Iterable[str]) -> bytes:
    items = [f"<{a}>" for a in addresses]
    return f"{name}: {(',' + chr(10) + ' ').join(items)}\n".encode()


def build_envelope_block(
    *,
    category: str,
    mail_id: str,
    sender: str,
    recipients: list[str],
    blocked: list[str] | None = None,
    findings: Iterable[tuple[str, str]] = (),
) -> bytes:
    """The header block amavisd-new writes in front of a quarantined message."""
    for addr in [sender, *recipients, *(blocked or [])]:
        if any(ch in addr for ch in "\r\n\0<>"):
            raise StoreError(f"envelope address {addr!r} contains a forbidden character")
    lines = [
        f"Return-Path: <{sender}>\n".encode(),
        f"Delivered-To: {DELIVERED_TO_BY_CATEGORY[category]}\n".encode(),
        f"X-Envelope-From: <{sender}>\n".encode(),
        _fold_addresses("X-Envelope-To", recipients),
        _fold_addresses("X-Envelope-To-Blocked", recipients if blocked is None else blocked),
        f"X-Quarantine-ID: <{mail_id}>\n".encode(),
    ]
    for name, value in findings:
        if not _ENVELOPE_FIELD_RE.match(name.encode("ascii", "replace")):
            raise StoreError(f"{name} is not a quarantine header field")
        lines.append(_fold(name, value.replace("\0", " ")))
    return b"".join(lines)


def _fold(name: str, value: str) -> bytes:
    """`name: value` folded at white space into lines of at most 78 characters where it
    can be (RFC 5322 2.1.1, as amavisd-new folds); a word too long for any line is cut."""
    lines = [f"{name}:"]
    for number, word in enumerate(value.split()):
        for start in range(0, len(word), _PIECE):
            piece = word[start : start + _PIECE]
            if number == start == 0 or len(lines[-1]) + 1 + len(piece) <= _SOFT_LIMIT:
                lines[-1] += " " + piece
            else:
                lines.append(" " + piece)
    return ("\n".join(lines) + "\n").encode()


_SOFT_LIMIT = 78
# The longest piece of one word on a line: well within the 998 octets a line may have.
_PIECE = 900


def received_field(mail_id: str, *, host: str = "localhost") -> bytes:
    """A Received field for the end of the block when the writer gave none and one is
    needed (amavisd-new always writes one there, spec 1.5 item 8)."""
    from email.utils import formatdate

    return (
        f"Received: by {host} (spamviewer) with ESMTP id {mail_id};\n"
        f" {formatdate(localtime=False)}\n"
    ).encode()


def starts_with_received(message: bytes) -> bool:
    return message[:9].lower() == b"received:"


def _read_as_envelope_field(message: bytes) -> bool:
    """Whether the message's first line would be read as part of the block before it: a
    field named like an envelope field (a message of its own starting with X-Envelope-To,
    say), or a continuation line of the block's last field."""
    if message[:1] in (b" ", b"\t"):
        return True
    end = message.find(b"\n")
    first = message if end < 0 else message[:end]
    colon = first.find(b":")
    return colon > 0 and bool(_ENVELOPE_FIELD_RE.match(first[:colon].strip()))


def to_lf(message: bytes) -> bytes:
    """CRLF line ends to LF, as amavisd-new stores them."""
    return message.replace(b"\r\n", b"\n")


def to_crlf(message: bytes) -> bytes:
    """Any line end (LF, CR, CRLF) to CRLF, for handing a stored message to SMTP."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", message)


class FileStore:
    """A quarantine directory (flat or with one level of sub-directories)."""

    def __init__(self, root: Path | str, *, subdir_levels: int = 1) -> None:
        self.root = Path(root)
        self.subdir_levels = subdir_levels

    # Keys ------------------------------------------------------------------------------
    def key_for(self, category: str, mail_id: str, *, gz: bool | None = None) -> str:
        if not MAIL_ID_RE.match(mail_id):
            raise StoreError(f"invalid mail_id {mail_id!r}")
        if gz is None:
            gz = category == "SPAM"
        name = f"{PREFIX_BY_CATEGORY[category]}-{mail_id}{'.gz' if gz else ''}"
        return f"{mail_id[0]}/{name}" if self.subdir_levels >= 1 else name

    def path(self, key: str) -> Path:
        """The file behind a key; a key that would leave the store is refused."""
        parts = key.split("/")
        if (
            not key
            or key.startswith("/")
            or "\\" in key
            or "\0" in key
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise StoreError(f"invalid storage key {key!r}")
        return self.root.joinpath(*parts)

    # Writing ---------------------------------------------------------------------------
    def write(
        self,
        *,
        category: str,
        mail_id: str,
        message: bytes,
        sender: str,
        recipients: list[str],
        blocked: list[str] | None = None,
        findings: Iterable[tuple[str, str]] = (),
        gz: bool | None = None,
    ) -> str:
        """Write a quarantine file durably and return its key.

        The data goes to a temporary name in the same directory, is fsynced, then renamed
        into place and the directory fsynced: a reader sees the whole file or none, and a
        crash leaves at most a temporary file that `cleanup_temporary` removes.
        """
        key = self.key_for(category, mail_id, gz=gz)
        final = self.path(key)
        block = build_envelope_block(
            category=category,
            mail_id=mail_id,
            sender=sender,
            recipients=recipients,
            blocked=blocked,
            findings=findings,
        )
        message = to_lf(message)
        if _read_as_envelope_field(message):
            # The block must end before the message, or its own first lines would be
            # read as envelope fields: a Received field ends it, as amavisd-new's does
            # (the filter worker always gives its own).
            block += received_field(mail_id)
        payload = block + message
        if final.name.endswith(".gz"):
            payload = gzip.compress(payload, compresslevel=6, mtime=0)
        directory = final.parent
        linked = False
        try:
            if not directory.is_dir():
                directory.mkdir(mode=0o750, parents=True, exist_ok=True)
                # Whatever the umask: the store's group (the viewer) reads it.
                os.chmod(directory, 0o750)  # noqa: S103 - the group's reading (spec 1.3)
                # The new directory's own entry, in its parent, is made durable too.
                fsync_directory(directory.parent)
            if final.exists():
                raise StoreError(f"{final}: a quarantine file with this id exists already")
            tmp = directory / f".tmp-{final.name}-{secrets.token_hex(6)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
            try:
                try:
                    os.fchmod(fd, 0o640)
                    view = memoryview(payload)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                # link() fails if the name exists, so a file is never overwritten.
                os.link(tmp, final)
                linked = True
            except BaseException:
                # A write cut short by a full disk holds the blocks it got: left here, it
                # would keep the disk full for the next, smaller message, and each retry
                # of this one would fill it again.
                _remove_quietly(tmp)
                raise
            os.unlink(tmp)
            fsync_directory(directory)
        except (StoreError, OSError) as exc:
            if linked:
                # Not durable, and the client hears a 4xx and sends it again: the file
                # goes, or the indexer would show it beside the copy to come.
                try:
                    os.unlink(final)
                except OSError:
                    log.exception("cannot remove %s after a failed write", final)
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"{final}: cannot write quarantine file ({exc.strerror})") from exc
        return key

    # Reading ---------------------------------------------------------------------------
    def read(self, key: str) -> bytes:
        """The file's content (inflated when it is a .gz)."""
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise StoreError(f"{path}: cannot open ({exc.strerror})") from exc
        with os.fdopen(fd, "rb") as raw:
            # An I/O error (a failing disk) is as much the store's failure as a bad gzip:
            # callers answer it as a file that cannot be read.
            try:
                head = raw.read(2)
                raw.seek(0)
                if head == b"\x1f\x8b":
                    with gzip.GzipFile(fileobj=raw) as gz:
                        data = gz.read(MAX_FILE_BYTES + 1)
                else:
                    data = raw.read(MAX_FILE_BYTES + 1)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise StoreError(f"{path}: unreadable ({exc})") from exc
        if len(data) > MAX_FILE_BYTES:
            raise StoreError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        return data

    def load(self, key: str) -> QuarantineFile:
        return parse_quarantine_file(self.read(key))

    def stat(self, key: str) -> os.stat_result:
        return os.stat(self.path(key), follow_symlinks=False)

    def exists(self, key: str) -> bool:
        try:
            return stat.S_ISREG(self.stat(key).st_mode)
        except (OSError, StoreError):
            return False

    def iter_files(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every regular file of the store as (key, stat); temporary files are skipped."""
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: not a directory")
        stack = [(self.root, "")]
        while stack:
            directory, prefix = stack.pop()
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError as exc:
                raise StoreError(f"{directory}: cannot list ({exc.strerror})") from exc
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                key = f"{prefix}{entry.name}"
                try:
                    if entry.is_dir(follow_symlinks=False):
                        # amavisd-new uses at most one level of sub-directories.
                        if not prefix:
                            stack.append((Path(entry.path), key + "/"))
                        continue
                    if entry.is_file(follow_symlinks=False):
                        yield key, entry.stat(follow_symlinks=False)
                except OSError:
                    continue

    # Deleting --------------------------------------------------------------------------
    def delete(self, key: str) -> bool:
        """Remove a file; False where it was gone already."""
        path = self.path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"{path}: cannot delete ({exc.strerror})") from exc
        return True

    def cleanup_temporary(self, *, older_than_seconds: float = 3600) -> int:
        """Remove temporary files left by a writer that died before its rename."""
        import time

        removed = 0
        limit = time.time() - older_than_seconds
        for directory in [self.root, *(p for p in self.root.iterdir() if p.is_dir())]:
            for tmp in directory.glob(".tmp-*"):
                try:
                    if tmp.stat().st_mtime < limit:
                        tmp.unlink()
                        removed += 1
                except OSError:
                    continue
        return removed


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        log.exception("cannot remove %s after a failed write", path)


def get_store(origin: str | Path | None = None) -> FileStore:
    """The store for an origin directory (the configured QUARANTINE_DIR by default)."""
    from django.conf import settings

    root = Path(origin) if origin else Path(settings.QUARANTINE_DIR)
    return FileStore(root, subdir_levels=settings.QUARANTINE_SUBDIR_LEVELS)
