"""Fixtures of the directory tests: a relay map under the test's own tmp dir and, for the
tests that need it, one real slapd per session (see tests/directory/slapd.py)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from ldap.dn import escape_dn_chars

from directory.models import Address
from tests.directory.slapd import SYNC_DN, SYNC_PW, Slapd, mail_object, person, start_slapd


@pytest.fixture(autouse=True)
def relay_map(settings, tmp_path):
    """Every test writes its relay map, side file and locks under its own tmp dir."""
    root = tmp_path / "postfix"
    root.mkdir()
    settings.RELAY_MAP_PATH = root / "relay_recipients"
    settings.RELAY_MAP_DIRECTORY_EXTRA = root / "relay_extra_directory"
    settings.RELAY_MAP_EXTRA = ""
    settings.RELAY_MAP_POSTMAP = "hash"
    settings.RELAY_MAP_POSTMAP_COMMAND = "postmap"
    settings.RELAY_MAP_MIN_RATIO = 0.5
    settings.RELAY_MAP_LOCK_TIMEOUT = 5
    settings.DIRECTORY_SYNC_LOCK = root / "directory-sync.lock"
    return settings.RELAY_MAP_PATH


def map_keys(settings) -> list[str]:
    """The addresses in the relay map's text, in its order."""
    return [line.split()[0] for line in settings.RELAY_MAP_PATH.read_text().splitlines()]


def addresses_of(username: str) -> set[str]:
    """The addresses the viewer user `username` has."""
    return set(Address.objects.filter(user__username=username)
               .values_list("address", flat=True))


def postmap_query(key: str, path: Path) -> subprocess.CompletedProcess:
    """`postmap -q key hash:path`, with its output."""
    return subprocess.run(["postmap", "-q", key, f"hash:{path}"], capture_output=True,
                          text=True)


def unsupported_postmap_type() -> str:
    """A map type this Postfix does not support (lmdb or cdb), to make postmap fail."""
    types = subprocess.run(["postconf", "-m"], capture_output=True, text=True).stdout.split()
    for kind in ("lmdb", "cdb"):
        if kind not in types:
            return kind
    pytest.fail("this Postfix supports both lmdb and cdb: no type left to make postmap fail")


@pytest.fixture(scope="session")
def slapd(tmp_path_factory) -> Slapd:
    server = start_slapd(tmp_path_factory.mktemp("slapd"))
    yield server
    server.stop()


@dataclass
class Org:
    """An organisational unit of the test's own in the shared slapd."""

    slapd: Slapd
    dn: str

    def person(self, cn: str, **attrs) -> str:
        return self.slapd.add(f"cn={escape_dn_chars(cn)},{self.dn}", person(cn, **attrs))

    def object(self, kind: str, cn: str, **attrs) -> str:
        return self.slapd.add(f"cn={escape_dn_chars(cn)},{self.dn}",
                              mail_object(kind, cn, **attrs))


@pytest.fixture
def directory(settings, slapd) -> Org:
    org = Org(slapd, slapd.new_ou())
    settings.LDAP_SERVER = slapd.ldaps_url
    settings.LDAP_BIND_DN = SYNC_DN
    settings.LDAP_BIND_PASSWORD = SYNC_PW
    settings.LDAP_CA_FILE = str(slapd.ca_file)
    settings.LDAP_ALLOW_INSECURE = False
    settings.LDAP_TIMEOUT = 3
    settings.LDAP_BASE_DN = [org.dn]
    return org
