"""Indexing a quarantine directory: amavisd-new style files in, Message/Recipient rows out.

A directory (flat, or with one level of sub-directories) is listed once; a file whose size
and mtime match its row is not opened again, a changed one is parsed again, and rows whose
file is gone are removed. Only the envelope block and the header section of the original
message are parsed, never the body. New rows are inserted in batches, so that a directory
of 100,000 files is indexed in one pass of a few seconds of database time.

A file with a PendingFileDeletion (its message was deleted, the file not unlinked yet) is
skipped, never indexed again: it is looked for when the directory is listed and again in
the transaction that inserts the rows, so a deletion committed in between wins. That
transaction holds the lock deletions take (quarantine.deletion.lock_store_files) from
before its check to its commit, so a deletion cannot commit between the two either: it
waits for the batch, then deletes the rows the batch inserted. The lock lasts one batch,
so that users' deletions never wait for a whole run.

A file that cannot be read (bad gzip, garbage, a quarantine name without a quarantine
header) or whose values the database refuses is reported by name and the run goes on: one
broken file never hides the others.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import parsedate_to_datetime
from pathlib import Path

from django.db import DataError, IntegrityError, transaction

from quarantine.deletion import lock_store_files
from quarantine.headers import display_value, format_addresses, make_visible
from quarantine.models import Message, PendingFileDeletion, Recipient
from quarantine.store import (
    MAIL_ID_RE,
    MAX_FILE_BYTES,
    FileStore,
    QuarantineFile,
    StoreError,
    get_store,
    name_info,
    parse_quarantine_file,
)

log = logging.getLogger(__name__)

# The envelope block plus the original header section must fit in this much of the
# (inflated) file; the rest of a file is never kept in memory.
HEAD_BYTES = 1024 * 1024
FIRST_READ_BYTES = 32 * 1024
# The original header section given to the header parser is cut here: hostile mail can
# carry megabytes of header lines. The parser is linear (about 30 ms for 1 MiB), and a
# bound this high keeps a Subject that follows a To field of thousands of addresses.
MAX_HEADER_BYTES = 1024 * 1024
_WANTED_FIELDS = frozenset({"from", "to", "subject", "date", "received"})
# Envelope recipients kept per message; far above any MTA's recipient limit (Postfix: 1000).
MAX_RECIPIENTS = 10_000
# Rows inserted per transaction.
BATCH_SIZE = 1000
# A Received date later than the file's mtime by more than this is not believed.
_CLOCK_SKEW = timedelta(days=1)

# amavisd-new quarantine kinds that the viewer does not hold (clean mail, archive copies,
# unchecked mail): recognised by name and skipped without being opened.
_NOT_HELD_PREFIXES = ("clean-", "archive-", "unchecked-")

_SCORE_RE = re.compile(r"\bscore=(\S+)")
_TESTS_RE = re.compile(r"\btests=\[([^\]]*)\]")
_ALERTS = (
    ("INFECTED, MESSAGE CONTAINS VIRUS:", "virus"),
    ("BANNED, MESSAGE CONTAINS", "banned"),
    ("BAD HEADER SECTION,", "bad header"),
)
_BLANK_LINE_RE = re.compile(rb"\r?\n\r?\n")
# Values of one file that the database refuses (DataError: a NUL, a value out of range) or
# that cannot be encoded for it (UnicodeError: a lone surrogate): that file is unreadable.
_REFUSED_VALUES = (DataError, UnicodeError)


class UnreadableFile(StoreError):
    """A file that should be a quarantine file but cannot be read or parsed."""


class SkippedFile(Exception):
    """A file that is not held mail (clean or archive copy, unrelated file)."""


ProgressCallback = Callable[[int, int], None]


@dataclass
class IndexSummary:
    """What one run over one directory did; `errors` name each file that was not indexed."""

    directory: str
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    unreadable: int = 0
    skipped: int = 0
    removed: int = 0
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"indexed {self.directory}: {self.new} new, {self.updated} updated, "
            f"{self.unchanged} unchanged, {self.unreadable} unreadable, "
            f"{self.skipped} skipped, {self.removed} removed"
        )


@dataclass
class ParsedFile:
    """An unsaved Message for one file and the envelope recipients it was held for."""

    message: Message
    recipients: list[str]


# Reading and parsing one file ----------------------------------------------------------


def parse_file(store: FileStore, key: str, st: os.stat_result) -> ParsedFile:
    """Parse one quarantine file into an unsaved Message.

    Raises SkippedFile for a file that is not held mail and UnreadableFile (with the path
    in its message) for one that should be but cannot be read.
    """
    path = store.path(key)
    name = key.rsplit("/", 1)[-1]
    if name.startswith(_NOT_HELD_PREFIXES):
        raise SkippedFile(f"{path}: not a held category")
    name_category, name_mail_id, _ = name_info(name)

    head, total_size = _read_head(store, key)
    qfile = parse_quarantine_file(head)
    if not qfile.fields:
        if name_category is None:
            raise SkippedFile(f"{path}: not a quarantine file")
        raise UnreadableFile(f"{path}: no quarantine header block")

    category = qfile.category or name_category
    if category is None:
        raise SkippedFile(f"{path}: not a held category")
    mail_id = _valid_mail_id(qfile.mail_id) or _valid_mail_id(name_mail_id)
    if mail_id is None:
        raise UnreadableFile(f"{path}: no valid mail_id in X-Quarantine-ID or the file name")

    headers = _original_headers(qfile.message)
    mtime = datetime.fromtimestamp(st.st_mtime, UTC)
    received_at = _parse_date(_received_date(headers.get("received")))
    if received_at is None or received_at > mtime + _CLOCK_SKEW:
        received_at = mtime
    envelope_size = len(head) - len(qfile.message)

    message = Message(
        mail_id=mail_id,
        category=category,
        envelope_sender=make_visible(qfile.sender)[:320],
        from_header=format_addresses(headers.get("from"), limit=1000),
        to_header=format_addresses(headers.get("to"), limit=2000),
        subject=display_value(headers.get("subject"), limit=1000),
        date=_parse_date(headers.get("date")),
        received_at=received_at,
        size=max(total_size - envelope_size, 0),
        spam_score=_spam_score(qfile),
        reasons="\n".join(_reasons(qfile)),
        origin=str(store.root),
        storage_key=key,
        file_size=st.st_size,
        file_mtime_ns=st.st_mtime_ns,
    )
    return ParsedFile(message=message, recipients=_recipients(qfile))


def _read_head(store: FileStore, key: str) -> tuple[bytes, int]:
    """The first HEAD_BYTES of the (inflated) file and the inflated size of the whole.

    A gzip file is inflated to its end, so that a truncated or corrupt stream is reported
    now rather than when someone releases the message; its content past the head is
    counted, not kept.
    """
    path = store.path(key)
    try:
        # O_NOFOLLOW: a symlink planted in the directory must not make us read elsewhere.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise UnreadableFile(f"{path}: cannot open ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as raw:
        try:
            magic = raw.read(2)
            raw.seek(0)
            if magic != b"\x1f\x8b":
                return _read_header_part(raw), os.fstat(fd).st_size
            with gzip.GzipFile(fileobj=raw) as gz:
                head = _read_header_part(gz)
                total = len(head)
                while chunk := gz.read(1024 * 1024):
                    total += len(chunk)
                    if total > MAX_FILE_BYTES:
                        raise UnreadableFile(f"{path}: inflates beyond {MAX_FILE_BYTES} bytes")
                return head, total
        except (OSError, EOFError, zlib.error) as exc:
            raise UnreadableFile(f"{path}: unreadable ({exc})") from exc


def _read_header_part(stream) -> bytes:
    """Read until the blank line that ends the original header section (or HEAD_BYTES).

    The envelope block has no blank line, so the first one ends the part we parse. Most
    files are read in one small read: a quarantine of large attachments costs the header
    bytes, not the attachments.
    """
    head = stream.read(FIRST_READ_BYTES)
    size = FIRST_READ_BYTES
    while len(head) < HEAD_BYTES and not _BLANK_LINE_RE.search(head):
        size = min(size * 4, HEAD_BYTES - len(head))
        chunk = stream.read(size)
        if not chunk:
            break
        head += chunk
    return head


def _original_headers(message: bytes) -> dict[str, bytes]:
    """First value of each header field of the original message, as raw bytes.

    Values stay bytes so that quarantine.headers decides the charset of 8-bit text
    (UTF-8, else latin-1), the same way for every page that shows them.
    """
    match = _BLANK_LINE_RE.search(message, 0, MAX_HEADER_BYTES)
    section = message[: match.end() if match else MAX_HEADER_BYTES]
    try:
        parsed = BytesHeaderParser(policy=compat32).parsebytes(section)
        items = parsed.raw_items()
    except Exception:  # noqa: BLE001 - a hostile header section must not stop indexing
        return {}
    out: dict[str, bytes] = {}
    for name, value in items:
        lname = str(name).lower()
        if lname not in _WANTED_FIELDS or lname in out:
            continue
        # compat32 keeps 8-bit bytes as surrogate escapes; this turns them back.
        out[lname] = str(value).encode("ascii", "surrogateescape")
    return out


def _received_date(value: bytes | None) -> bytes | None:
    """The date after the last `;` of a Received field (amavisd-new's own, topmost)."""
    if not value or b";" not in value:
        return None
    return value.rsplit(b";", 1)[1]


def _parse_date(value: bytes | str | None) -> datetime | None:
    """An RFC 5322 date as an aware UTC datetime; None for anything unparseable."""
    if not value:
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    text = " ".join(text.split())[:200]
    try:
        parsed = parsedate_to_datetime(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except Exception:  # noqa: BLE001 - ValueError, TypeError, OverflowError on junk dates
        return None


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    value = value.strip().rstrip(",")
    # amavisd-new writes `min..max` when recipients got different scores.
    if ".." in value:
        value = value.rsplit("..", 1)[1]
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _spam_score(qfile: QuarantineFile) -> float | None:
    """X-Spam-Score, or score= of X-Spam-Status; None where spam checks did not run."""
    status = qfile.first("X-Spam-Status") or ""
    match = _SCORE_RE.search(status)
    status_score = match.group(1).rstrip(",") if match else None
    # score=x: the spam checks were skipped (a virus was found first); the 0 that
    # amavisd-new then writes in X-Spam-Score is not a score.
    if status_score == "x":
        return None
    score = _float(qfile.first("X-Spam-Score"))
    return score if score is not None else _float(status_score)


def _reasons(qfile: QuarantineFile) -> list[str]:
    """Virus names, banned parts, the bad-header finding and the spam tests, one a line."""
    out: list[str] = []
    for alert in qfile.all("X-Amavis-Alert"):
        text = " ".join(alert.split())
        upper = text.upper()
        for prefix, label in _ALERTS:
            if upper.startswith(prefix):
                text = f"{label}: {text[len(prefix):].strip()}"
                break
        out.append(display_value(text, limit=1000))
    match = _TESTS_RE.search(qfile.first("X-Spam-Status") or "")
    if match:
        tests = [t.strip() for t in match.group(1).split(",") if t.strip()]
        if tests:
            out.append(display_value("tests: " + ", ".join(tests), limit=1000))
    return [r for r in out if r]


def _recipients(qfile: QuarantineFile) -> list[str]:
    """Blocked envelope recipients, lower-cased, each once; unusable values dropped."""
    seen: dict[str, None] = {}
    for address in qfile.blocked_recipients:
        address = address.strip().lower()
        if not address or len(address) > 320 or make_visible(address) != address:
            continue
        if " " in address:
            continue
        seen[address] = None
        if len(seen) >= MAX_RECIPIENTS:
            break
    return list(seen)


def _valid_mail_id(value: str | None) -> str | None:
    if value and len(value) <= 32 and MAIL_ID_RE.match(value):
        return value
    return None


# Saving -----------------------------------------------------------------------------


def index_file(store: FileStore, key: str, st: os.stat_result | None = None) -> Message:
    """Index one file now (insert or refresh its rows) and return its saved Message.

    Raises SkippedFile, UnreadableFile (also when the database refuses its values), or
    StoreError when its mail_id is indexed already from another file."""
    if st is None:
        try:
            st = store.stat(key)
        except OSError as exc:
            raise UnreadableFile(f"{store.path(key)}: cannot stat ({exc.strerror})") from exc
    parsed = parse_file(store, key, st)
    try:
        with transaction.atomic():
            row_id = (
                Message.objects.filter(origin=str(store.root), storage_key=key)
                .values_list("id", flat=True)
                .first()
            )
            if row_id is None:
                _insert_one(parsed)
            else:
                _update(row_id, parsed)
    except IntegrityError as exc:
        raise StoreError(_conflict_text(parsed, exc)) from exc
    except _REFUSED_VALUES as exc:
        raise UnreadableFile(_refused_text(parsed, exc)) from exc
    return Message.objects.get(origin=str(store.root), storage_key=key)


def _recipient_rows(message: Message, addresses: list[str]) -> list[Recipient]:
    return [
        Recipient(
            message=message,
            address=address,
            received_at=message.received_at,
            category=message.category,
        )
        for address in addresses
    ]


def _insert_one(parsed: ParsedFile) -> None:
    parsed.message.save(force_insert=True)
    Recipient.objects.bulk_create(_recipient_rows(parsed.message, parsed.recipients))


_UPDATED_FIELDS = [
    "mail_id", "category", "envelope_sender", "from_header", "to_header", "subject", "date",
    "received_at", "size", "spam_score", "reasons", "file_size", "file_mtime_ns",
]


def _update(row_id: int, parsed: ParsedFile) -> None:
    """Refresh a row from its changed file; recipients still there keep their release."""
    new = parsed.message
    Message.objects.filter(id=row_id).update(
        **{name: getattr(new, name) for name in _UPDATED_FIELDS}
    )
    kept = Recipient.objects.filter(message_id=row_id)
    kept.exclude(address__in=parsed.recipients).delete()
    kept.update(received_at=new.received_at, category=new.category)
    present = set(kept.values_list("address", flat=True))
    new.id = row_id
    Recipient.objects.bulk_create(
        _recipient_rows(new, [a for a in parsed.recipients if a not in present])
    )


def _conflict_text(parsed: ParsedFile, exc: Exception | None = None) -> str:
    message = parsed.message
    where = f"{message.origin}/{message.storage_key}"
    other = (
        Message.objects.filter(mail_id=message.mail_id)
        .exclude(origin=message.origin, storage_key=message.storage_key)
        .values_list("origin", "storage_key")
        .first()
    )
    if other:
        return (
            f"{where}: mail_id {message.mail_id} is already indexed from "
            f"{other[0]}/{other[1]}; not indexed"
        )
    return f"{where}: not indexed ({exc})"


def _refused_text(parsed: ParsedFile, exc: Exception) -> str:
    message = parsed.message
    return f"{message.origin}/{message.storage_key}: not indexed, values refused ({exc})"


# A whole directory ---------------------------------------------------------------------


def index_directory(root: str | Path, *, progress: ProgressCallback | None = None) -> IndexSummary:
    """Bring the index of one store directory up to date with its files.

    Raises StoreError when the directory does not exist or cannot be listed: nothing is
    removed from the index then, since an unlistable directory says nothing about its files.
    `progress(done, total)` is called as files are handled.
    """
    given = Path(root)
    try:
        resolved = given.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        reason = getattr(exc, "strerror", None) or exc
        raise StoreError(f"{given}: cannot open directory ({reason})") from exc
    store = FileStore(resolved)
    summary = IndexSummary(directory=str(resolved))
    # Rows written under another spelling of the same directory (a symlinked path, a
    # relative one) belong to it too; new rows use the resolved path.
    origins = {str(resolved), str(given), str(given.absolute())}
    # Rows are read before the files are listed: a message the filter stores meanwhile
    # then shows up as a new file (found indexed already), never as a row without a file.
    existing: dict[str, tuple[int, int, int]] = {}
    for row_id, key, size, mtime_ns in Message.objects.filter(origin__in=origins).values_list(
        "id", "storage_key", "file_size", "file_mtime_ns"
    ):
        existing[key] = (row_id, size, mtime_ns)
    # The whole listing before any change: if listing fails half-way, no row may be taken
    # for gone.
    files = list(store.iter_files())
    deleting = set(
        PendingFileDeletion.objects.filter(origin__in=origins).values_list(
            "storage_key", flat=True
        )
    )

    listed = {key for key, _ in files}
    gone = [row[0] for key, row in existing.items() if key not in listed]
    for start in range(0, len(gone), BATCH_SIZE):
        # The files are gone already: only the rows go (their recipients cascade).
        Message.objects.filter(id__in=gone[start : start + BATCH_SIZE]).delete()
    summary.removed = len(gone)

    pending: list[ParsedFile] = []
    total = len(files)
    for done, (key, st) in enumerate(files, start=1):
        row = existing.get(key)
        if key in deleting:
            summary.skipped += 1
        elif row is not None and row[1] == st.st_size and row[2] == st.st_mtime_ns:
            summary.unchanged += 1
        else:
            try:
                parsed = parse_file(store, key, st)
            except SkippedFile:
                summary.skipped += 1
            except StoreError as exc:
                summary.unreadable += 1
                summary.errors.append(str(exc))
            except Exception as exc:
                # Whatever a crafted file makes the parse raise, the run goes on: the
                # file is reported (with the trace in the log) and the others indexed.
                log.exception("cannot parse %s", store.path(key))
                summary.unreadable += 1
                summary.errors.append(f"{store.path(key)}: cannot parse ({exc!r:.200})")
            else:
                if row is None:
                    pending.append(parsed)
                else:
                    _update_changed(row[0], parsed, summary)
            if len(pending) >= BATCH_SIZE:
                _insert_batch(pending, summary, origins)
                pending = []
        if progress is not None:
            progress(done, total)
    if pending:
        _insert_batch(pending, summary, origins)
    for error in summary.errors:
        log.warning("%s", error)
    return summary


def _update_changed(row_id: int, parsed: ParsedFile, summary: IndexSummary) -> None:
    try:
        with transaction.atomic():
            _update(row_id, parsed)
    except IntegrityError as exc:
        summary.skipped += 1
        summary.errors.append(_conflict_text(parsed, exc))
    except _REFUSED_VALUES as exc:
        summary.unreadable += 1
        summary.errors.append(_refused_text(parsed, exc))
    else:
        summary.updated += 1


def _insert_batch(pending: list[ParsedFile], summary: IndexSummary, origins: set[str]) -> None:
    """Insert new rows: one query to find mail_id clashes, then two bulk inserts.

    A clash found only at insert time (another indexer or the filter inserted the same
    mail_id meanwhile), or a value the database refuses, sends the batch through row-by-row
    inserts, each in its own savepoint, so that one file does not lose the batch: a clash
    is counted as skipped, a refused value as unreadable. A file whose deletion is pending
    is skipped.
    """
    taken = {
        mail_id: (origin, key)
        for mail_id, origin, key in Message.objects.filter(
            mail_id__in={p.message.mail_id for p in pending}
        ).values_list("mail_id", "origin", "storage_key")
    }
    batch: list[ParsedFile] = []
    in_batch: set[str] = set()
    for parsed in pending:
        mail_id = parsed.message.mail_id
        if mail_id in taken and _is_same_file(taken[mail_id], parsed, origins):
            # Stored and indexed by the filter since this run read the rows.
            summary.unchanged += 1
        elif mail_id in taken:
            summary.skipped += 1
            summary.errors.append(_conflict_text(parsed))
        elif mail_id in in_batch:
            first = next(p for p in batch if p.message.mail_id == mail_id)
            summary.skipped += 1
            summary.errors.append(
                f"{parsed.message.origin}/{parsed.message.storage_key}: mail_id {mail_id} "
                f"is already indexed from {first.message.origin}/{first.message.storage_key}"
                "; not indexed"
            )
        else:
            in_batch.add(mail_id)
            batch.append(parsed)
    if not batch:
        return
    try:
        with transaction.atomic():
            lock_store_files(indexing=True)
            deleting = _deleting(batch, origins)
            inserted = [p for p in batch if p.message.storage_key not in deleting]
            messages = Message.objects.bulk_create([p.message for p in inserted])
            Recipient.objects.bulk_create(
                [r for m, p in zip(messages, inserted, strict=True)
                 for r in _recipient_rows(m, p.recipients)],
                batch_size=5000,
            )
        summary.new += len(inserted)
        summary.skipped += len(batch) - len(inserted)
        return
    except (IntegrityError, *_REFUSED_VALUES):
        pass
    for parsed in batch:
        parsed.message.pk = None
        try:
            with transaction.atomic():
                lock_store_files(indexing=True)
                if _deleting([parsed], origins):
                    summary.skipped += 1
                    continue
                _insert_one(parsed)
        except IntegrityError as exc:
            row = (
                Message.objects.filter(mail_id=parsed.message.mail_id)
                .values_list("origin", "storage_key")
                .first()
            )
            if row is not None and _is_same_file(row, parsed, origins):
                summary.unchanged += 1
            else:
                summary.skipped += 1
                summary.errors.append(_conflict_text(parsed, exc))
        except _REFUSED_VALUES as exc:
            summary.unreadable += 1
            summary.errors.append(_refused_text(parsed, exc))
        else:
            summary.new += 1


def _deleting(batch: list[ParsedFile], origins: set[str]) -> set[str]:
    """Storage keys of the batch not to index: their files have a pending deletion, or
    are gone already (a deletion that committed and unlinked since they were listed)."""
    pending = set(
        PendingFileDeletion.objects.filter(
            origin__in=origins, storage_key__in=[p.message.storage_key for p in batch]
        ).values_list("storage_key", flat=True)
    )
    return pending | {
        p.message.storage_key
        for p in batch
        if p.message.storage_key not in pending
        and not os.path.lexists(get_store(p.message.origin).path(p.message.storage_key))
    }


def _is_same_file(row: tuple[str, str], parsed: ParsedFile, origins: set[str]) -> bool:
    return row[0] in origins and row[1] == parsed.message.storage_key
