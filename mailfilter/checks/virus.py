"""Built-in virus signatures: MessageWall's virus_scan, without an external scanner.

A signature file (format documented at the top of `mailfilter/signatures/default.sigs`)
holds named byte patterns; a pattern matches anywhere in a blob. The caller hands over
every blob worth scanning as `(label, bytes)` pairs (the raw message, so that header
fields, preambles and epilogues are covered, then each decoded part, embedded files and
archive members), and gets one hit per signature and blob.

`SignatureLibrary` keeps the parsed files that profiles name and reloads them all at once
(`messagewallctl reload-virus`); a file that no longer parses leaves the old set in use.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mailfilter.findings import Finding
from mailfilter.profiles import Profile

MIN_PATTERN = 6
_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2}|\?\?)+")


class SignatureError(ValueError):
    """A signature file that does not parse; names the file, the line and the reason."""

    def __init__(self, path: str | os.PathLike[str], line: int, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}:{line}: {reason}" if line else f"{self.path}: {reason}")


@dataclass(frozen=True)
class Signature:
    name: str
    literal: bytes | None
    pattern: re.Pattern[bytes] | None

    def found_in(self, data: bytes) -> bool:
        if self.literal is not None:
            return self.literal in data
        assert self.pattern is not None
        return self.pattern.search(data) is not None


@dataclass(frozen=True)
class SignatureHit:
    name: str
    label: str


@dataclass(frozen=True)
class SignatureSet:
    signatures: tuple[Signature, ...] = ()

    def __len__(self) -> int:
        return len(self.signatures)

    def __or__(self, other: SignatureSet) -> SignatureSet:
        return SignatureSet(self.signatures + other.signatures)

    def scan(self, blobs: Iterable[tuple[str, bytes]]) -> list[SignatureHit]:
        """Every (signature, blob) that matches, in blob order."""
        hits = []
        for label, data in blobs:
            for signature in self.signatures:
                if signature.found_in(data):
                    hits.append(SignatureHit(name=signature.name, label=label))
        return hits


def parse_signatures(text: str, *, path: str | os.PathLike[str] = "<signatures>") -> SignatureSet:
    signatures = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, body = line.partition("=")
        name = name.strip()
        if not sep:
            raise SignatureError(path, number, "expected NAME=PATTERN")
        if not _NAME.fullmatch(name):
            raise SignatureError(path, number, f"bad signature name {name!r}")
        if body.startswith("text:"):
            literal = body[5:].encode("utf-8")
            if len(literal) < MIN_PATTERN:
                raise SignatureError(path, number, f"pattern shorter than {MIN_PATTERN} bytes")
            signatures.append(Signature(name, literal, None))
            continue
        body = body.strip()
        if not _HEX.fullmatch(body):
            raise SignatureError(path, number, "pattern is neither hex digits nor text:...")
        if len(body) // 2 < MIN_PATTERN:
            raise SignatureError(path, number, f"pattern shorter than {MIN_PATTERN} bytes")
        if "??" not in body:
            signatures.append(Signature(name, bytes.fromhex(body), None))
            continue
        pieces = [
            b"." if body[i : i + 2] == "??" else re.escape(bytes.fromhex(body[i : i + 2]))
            for i in range(0, len(body), 2)
        ]
        signatures.append(Signature(name, None, re.compile(b"".join(pieces), re.DOTALL)))
    return SignatureSet(tuple(signatures))


def load_signatures(path: str | os.PathLike[str]) -> SignatureSet:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SignatureError(path, 0, f"cannot read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SignatureError(path, data[: error.start].count(b"\n") + 1, "not UTF-8") from None
    return parse_signatures(text, path=path)


class SignatureLibrary:
    """Parsed signature files by path, reloaded together."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]] = ()) -> None:
        self._lock = threading.Lock()
        self._paths = {Path(path).resolve() for path in paths}
        self._sets: Mapping[Path, SignatureSet] = {}
        # The resolved path of each name `get` was given, until the next reload.
        self._resolved: dict[str, Path] = {}
        self.reload()

    def reload(self, paths: Iterable[str | os.PathLike[str]] | None = None) -> None:
        """Read the files again (or this new list of files); on error keep the old sets."""
        with self._lock:
            wanted = self._paths if paths is None else {Path(p).resolve() for p in paths}
            fresh = {path: load_signatures(path) for path in sorted(wanted)}
            self._paths, self._sets = wanted, fresh
            self._resolved = {}

    def get(self, path: str | os.PathLike[str]) -> SignatureSet:
        """The set of one file, read now if no profile named it at the last reload."""
        key = os.fspath(path)
        resolved = self._resolved.get(key)
        if resolved is None:
            resolved = self._resolved[key] = Path(key).resolve()
        path = resolved
        found = self._sets.get(path)
        if found is None:
            with self._lock:
                found = self._sets.get(path) or load_signatures(path)
                self._paths = self._paths | {path}
                self._sets = {**self._sets, path: found}
        return found

    def __len__(self) -> int:
        return sum(len(found) for found in self._sets.values())


def check_virus(
    blobs: Iterable[tuple[str, bytes]], *, profile: Profile, library: SignatureLibrary
) -> list[Finding]:
    """VIRUS findings for the profile's virus_scan files, one per signature and blob."""
    blobs = list(blobs)
    findings = []
    for rule in profile.virus_scan:
        for hit in library.get(rule.value).scan(blobs):
            findings.append(Finding("VIRUS", hit.name, rule.score, f"{hit.name} in {hit.label}"))
    return findings
