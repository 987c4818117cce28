"""Which recipients the worker accepts when it faces other MTAs itself (FILTER_MODE=front).

The relay map is the file Postfix reads as relay_recipient_maps (`address OK` lines,
`@domain` for a whole domain, `#` comments); it is read again whenever its modification
time or size changes, so a sync that replaces it (write, fsync, rename) takes effect at
the next RCPT. Addresses of FILTER_RELAY_DOMAINS are all accepted.

No open relay (case 31): a recipient is ours only when its domain is ours *and* its local
part cannot route anywhere else: `%`, `!`, `@`, a quote or a source route in it make
backends (sendmail's percent hack, UUCP bang paths, RFC 821 routes) relay elsewhere.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger(__name__)

_ROUTING = re.compile(r'[%!@":\\\s\x00-\x1f\x7f]')


class RelayRecipients:
    def __init__(self, *, map_path: str = "", domains: tuple[str, ...] = ()) -> None:
        self.map_path = map_path
        self.domains = frozenset(d.lower().strip(".") for d in domains)
        self._addresses: frozenset[str] = frozenset()
        self._signature: tuple[int, int] | None = None

    def accepts(self, address: str) -> bool:
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or address.startswith("@"):
            return False
        if _ROUTING.search(local) or not re.fullmatch(r"[A-Za-z0-9.-]+", domain):
            return False
        domain = domain.lower().strip(".")
        if domain in self.domains:
            return True
        if not self.map_path:
            return False
        addresses = self._current()
        return f"{local.lower()}@{domain}" in addresses or f"@{domain}" in addresses

    def _current(self) -> frozenset[str]:
        try:
            stat = os.stat(self.map_path)
        except OSError as exc:
            # Keep what was read last: a map being replaced must not refuse everyone.
            log.warning("relay map %s: %s", self.map_path, exc.strerror)
            return self._addresses
        signature = (stat.st_mtime_ns, stat.st_size)
        if signature != self._signature:
            try:
                self._addresses = read_relay_map(self.map_path)
            except OSError as exc:
                log.warning("relay map %s: %s", self.map_path, exc.strerror)
                return self._addresses
            self._signature = signature
        return self._addresses


def read_relay_map(path: str) -> frozenset[str]:
    """The keys of a Postfix `key value` table file, lower-cased."""
    keys = set()
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip() or line.lstrip().startswith("#") or line[:1].isspace():
                continue
            keys.add(line.split(None, 1)[0].lower())
    return frozenset(keys)
