"""Writing the Postfix relay_recipient_maps source: one `address OK` line per deliverable
address.

Where the keys come from:
- every `directory.Address` (local and directory-sourced);
- the addresses the directory sync found on objects that are not viewer users (groups,
  contacts, public folders, addresses two directory objects claim), kept by the sync in a
  side file, RELAY_MAP_DIRECTORY_EXTRA, one address per line, so that `writerelaymap` can
  rebuild the same map without asking the directory again (the sync replaces the side file
  and the map under one lock, the side file first, and puts the side file back when the
  map cannot be replaced);
- the static file RELAY_MAP_EXTRA kept by the administrator (`key [value]` lines, `#`
  comments; the only place where an `@domain` catch-all may come from).

Why so careful: Postfix rejects every recipient that is not in the map, so a map that is
suddenly empty or much smaller bounces real mail. A map that shrinks below
RELAY_MAP_MIN_RATIO of the current one (or is empty) is refused unless forced, and the file
is replaced atomically so that Postfix never reads half of it. In the source format a line
that starts with white space continues the previous one and `#` starts a comment, so only
keys that cannot carry either are written.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from spamviewer.durable import fsync_directory

log = logging.getLogger(__name__)

# The indexed file each postmap type writes next to the source.
POSTMAP_SUFFIXES = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb", "cdb": ".cdb"}

MAX_KEY_LENGTH = 320
MAX_LOCAL_LENGTH = 64
# Printable ASCII without white space, `#` (comment), quotes, `\` and the characters that
# have a meaning in an address list or in Postfix's table syntax.
_LOCAL = r"[A-Za-z0-9!$%&'*+/=?^_`{|}~.-]+"
_DOMAIN = r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_ADDRESS_RE = re.compile(rf"(?P<local>{_LOCAL})@(?P<domain>{_DOMAIN})")
_CATCHALL_RE = re.compile(rf"@{_DOMAIN}")


class RelayMapError(Exception):
    """The map was not replaced; the previous one is still in place."""


class RelayMapShrinkRefused(RelayMapError):
    def __init__(self, path: Path, new_count: int, current_count: int, min_ratio: float):
        super().__init__(
            f"refusing to replace {path}: the new map has {new_count} addresses, the current "
            f"one {current_count} (minimum ratio {min_ratio:g}); use --force if that is right"
        )
        self.new_count = new_count
        self.current_count = current_count


class RelayMapBusy(RelayMapError):
    pass


class PostmapFailed(RelayMapError):
    pass


@dataclass
class RelayMapResult:
    path: Path
    count: int
    previous_count: int
    rejected: list[str] = field(default_factory=list)
    postmap_type: str | None = None

    def __str__(self) -> str:
        text = f"relay map {self.path}: {self.count} addresses (was {self.previous_count})"
        if self.rejected:
            text += f", {len(self.rejected)} invalid values left out"
        return text


def map_key(value: str) -> str | None:
    """The map key for a directory or database address, or None when it must not be one.

    Lower-cased; exactly `local@domain` in printable ASCII, no white space, no `#`, no
    control characters, no quoting, no `@domain` catch-all.
    """
    if not isinstance(value, str) or len(value) > MAX_KEY_LENGTH:
        return None
    key = value.lower()
    match = _ADDRESS_RE.fullmatch(key)
    if match is None or len(match["local"]) > MAX_LOCAL_LENGTH:
        return None
    local = match["local"]
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return None
    return key


def _static_key(value: str) -> str | None:
    """A key from the administrator's extras file: an address or an `@domain` catch-all."""
    key = map_key(value)
    if key is None and len(value) <= MAX_KEY_LENGTH and _CATCHALL_RE.fullmatch(value.lower()):
        key = value.lower()
    return key


def read_address_file(path: Path | str | None) -> list[str]:
    """Values from a file of `key [value]` lines; blank lines and `#` comments skipped."""
    if not path:
        return []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    values = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        values.append(stripped.split()[0])
    return values


def write_address_file(path: Path, addresses: Iterable[str]) -> None:
    """Write one address per line, atomically, in the side file's format.

    It takes no lock: the sync replaces its side file together with the map, under the
    map's lock (write_relay_map_locked)."""
    _atomic_write(path, "".join(f"{a}\n" for a in sorted(set(addresses))))


def collect_keys(
    *, directory_extra: Iterable[str] | None = None
) -> tuple[list[str], list[str]]:
    """(sorted unique keys, rejected values) of the map as it would be written now.

    `directory_extra` replaces the sync's side file when given (the sync passes what it
    has just found, before the file is written).
    """
    from directory.models import Address

    keys: set[str] = set()
    rejected: list[str] = []

    def take(values: Iterable[str], check) -> None:
        for value in values:
            key = check(value)
            if key is None:
                rejected.append(value)
            else:
                keys.add(key)

    take(Address.objects.values_list("address", flat=True).iterator(chunk_size=5000), map_key)
    if directory_extra is None:
        directory_extra = read_address_file(settings.RELAY_MAP_DIRECTORY_EXTRA)
    take(directory_extra, map_key)
    take(read_address_file(settings.RELAY_MAP_EXTRA), _static_key)
    for value in rejected:
        log.warning("relay map: left out an invalid address %r", value[:200])
    return sorted(keys), rejected


def count_keys(path: Path) -> int:
    """The number of entries in an existing map source (0 when there is none)."""
    return len(read_address_file(path))


def check_size(new_count: int, *, force: bool = False, path: Path | None = None) -> int:
    """Raise RelayMapShrinkRefused when `new_count` would be an empty or shrunken map.

    Returns the current map's size.
    """
    path = Path(path or settings.RELAY_MAP_PATH)
    current = count_keys(path)
    ratio = float(settings.RELAY_MAP_MIN_RATIO)
    if not force and (new_count == 0 or new_count < current * ratio):
        raise RelayMapShrinkRefused(path, new_count, current, ratio)
    return current


def map_lock() -> contextlib.AbstractContextManager[None]:
    """The lock every writer of the map and of the side file holds, waiting up to
    RELAY_MAP_LOCK_TIMEOUT seconds, else RelayMapBusy."""
    path = Path(settings.RELAY_MAP_PATH)
    path.parent.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(path.with_name(path.name + ".lock"),
                          timeout=settings.RELAY_MAP_LOCK_TIMEOUT,
                          busy=RelayMapBusy(f"another process is writing {path}"))


def write_relay_map(
    *, force: bool = False, directory_extra: Iterable[str] | None = None
) -> RelayMapResult:
    """Rebuild the map from the database and the extras files and put it in place.

    Raises RelayMapError (and leaves the current map and its database alone) when the new
    map would be empty or too small without `force`, when postmap fails or cannot be run,
    or when another writer holds the lock for longer than RELAY_MAP_LOCK_TIMEOUT seconds.
    """
    with map_lock():
        return write_relay_map_locked(force=force, directory_extra=directory_extra)


def write_relay_map_locked(
    *, force: bool = False, directory_extra: Iterable[str] | None = None,
    replace_side_file: bool = False,
) -> RelayMapResult:
    """write_relay_map for a caller that already holds map_lock().

    With `replace_side_file`, `directory_extra` also becomes the content of the side file
    RELAY_MAP_DIRECTORY_EXTRA: the side file is replaced first, then the map; when the map
    cannot be replaced, the previous side file is put back, so that the two never disagree.
    """
    path = Path(settings.RELAY_MAP_PATH)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory_extra is not None:
        directory_extra = sorted(set(directory_extra))
    keys, rejected = collect_keys(directory_extra=directory_extra)
    previous = check_size(len(keys), force=force, path=path)
    content = "".join(f"{key} OK\n" for key in keys)
    postmap_type = _postmap_type()
    with contextlib.ExitStack() as stack:
        if replace_side_file:
            if directory_extra is None:
                raise ValueError("replace_side_file needs directory_extra")
            stack.enter_context(_side_file_replaced(
                Path(settings.RELAY_MAP_DIRECTORY_EXTRA), directory_extra))
        _replace_map(path, content, postmap_type)
    result = RelayMapResult(path=path, count=len(keys), previous_count=previous,
                            rejected=rejected, postmap_type=postmap_type)
    log.info("%s", result)
    return result


@contextlib.contextmanager
def _side_file_replaced(path: Path, addresses: Iterable[str]) -> Iterator[None]:
    """Replace the side file; put the previous one back (or remove the new one when there
    was none) when the block raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = path.with_name(f".{path.name}.kept")
    with contextlib.suppress(FileNotFoundError):
        kept.unlink()
    try:
        os.link(path, kept)
        existed = True
    except FileNotFoundError:
        existed = False
    try:
        _atomic_write(path, "".join(f"{a}\n" for a in sorted(set(addresses))))
        yield
    except BaseException:
        if existed:
            os.replace(kept, path)
        else:
            path.unlink(missing_ok=True)
        fsync_directory(path.parent)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            kept.unlink()


def _postmap_type() -> str | None:
    """The postmap type to build, None for a map Postfix reads as text (texthash, none).

    Raises PostmapFailed when the type needs postmap and the command cannot be found:
    replacing the text alone would leave Postfix reading the previous database."""
    kind = settings.RELAY_MAP_POSTMAP
    if kind not in POSTMAP_SUFFIXES:
        return None
    if shutil.which(settings.RELAY_MAP_POSTMAP_COMMAND) is None:
        raise PostmapFailed(
            f"{settings.RELAY_MAP_POSTMAP_COMMAND} not found: {kind}:{settings.RELAY_MAP_PATH} "
            "cannot be rebuilt; the previous map is kept (install Postfix where the map is "
            "written, or set RELAY_MAP_POSTMAP=texthash for a map Postfix reads as text)")
    return kind


def _replace_map(path: Path, content: str, postmap_type: str | None) -> None:
    tmp = _write_temp(path, content)
    suffix = POSTMAP_SUFFIXES.get(postmap_type or "")
    try:
        if postmap_type:
            _postmap(postmap_type, tmp)
            _fsync_file(Path(str(tmp) + suffix))
        _keep_previous(path)
        if suffix:
            _keep_previous(Path(str(path) + suffix), copy=True)
            # The database first: it is what Postfix reads. Each rename is atomic.
            os.replace(str(tmp) + suffix, str(path) + suffix)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        for leftover in (tmp, Path(str(tmp) + suffix) if suffix else None):
            if leftover is not None:
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()


def _postmap(kind: str, source: Path) -> None:
    # An argument list, never a shell: the path comes from settings, and nothing from the
    # directory ever reaches a command line.
    command = [settings.RELAY_MAP_POSTMAP_COMMAND, f"{kind}:{source}"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PostmapFailed(f"postmap {kind}:{source} failed: {exc}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-500:]
        raise PostmapFailed(
            f"postmap {kind}:{source} exited with {proc.returncode}: {detail}; "
            "the previous map is kept"
        )


def _keep_previous(path: Path, *, copy: bool = False) -> None:
    """Keep the file being replaced as `<name>.previous`, for a manual rollback.

    The database Postfix reads is copied, not linked: an smtpd notices a changed map only
    when the file it holds open loses its last link (or its time changes), and then
    starts afresh with the new one. Kept alive by a link, the old database would go on
    answering, and an address just added would be refused as unknown."""
    previous = path.with_name(path.name + ".previous")
    with contextlib.suppress(FileNotFoundError):
        previous.unlink()
    if not copy:
        with contextlib.suppress(FileNotFoundError):
            os.link(path, previous)
        return
    # A copy takes as much room as the database: made under a temporary name and renamed,
    # a crash or a full disk never leaves a partial one. Without room for it the map is
    # replaced all the same (the previous text, kept by a link, rebuilds the database with
    # postmap): a map left as it was would go on refusing the addresses just added.
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{previous.name}.", suffix=".tmp",
                                    dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        shutil.copyfile(path, tmp)
        tmp.chmod(0o644)
        _fsync_file(tmp)
        os.replace(tmp, previous)
        tmp = None
    except FileNotFoundError:
        pass  # no database yet: nothing to keep
    except OSError as exc:
        log.warning("%s: cannot keep a copy as %s (%s); the map is replaced without it",
                    path, previous.name, exc)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _write_temp(path: Path, content: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="ascii", newline="\n") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        # Postfix's processes read the map as another user: world-readable, as the
        # files under /etc/postfix are; it holds no secret.
        tmp.chmod(0o644)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _atomic_write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path, content)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, *, timeout: float, busy: Exception) -> Iterator[None]:
    """An exclusive flock on `lock_path`, waiting up to `timeout` seconds, else `busy`.

    The kernel drops the lock when the process dies, so a crashed writer never leaves a
    stale lock behind."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise busy from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
