"""Throw-away DNS servers on loopback for the DNS check tests: Debian's dnsmasq.

`DnsServers.start(records)` runs, each on its own ephemeral 127.0.0.1 port (UDP and TCP):

- `port`: the server the checks ask. It answers from the records given (dnsmasq
  configuration lines: `address=`, `host-record=`, `ptr-record=`, `mx-host=`,
  `txt-record=`), answers NXDOMAIN for any other name under `test`, `in-addr.arpa` and
  `ip6.arpa`, REFUSED elsewhere (it has no upstream), and forwards
  - `auth.test` to the second dnsmasq, authoritative for that zone, whose NXDOMAIN
    answers carry the zone's SOA as a real list's do (`auth_records`);
  - `slow.test` to `silent_port`, a UDP socket that reads nothing and answers nothing,
    so that every query for that zone times out.

Nothing is sent beyond 127.0.0.1. `stop()` ends both processes and closes the socket.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
START_TIMEOUT = 10.0

_COMMON = """\
no-resolv
no-hosts
bind-interfaces
listen-address=127.0.0.1
port={port}
pid-file=
log-facility=-
"""


def _free_port() -> int:
    """A loopback port free for both UDP and TCP when it was picked."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port")


def _ready(port: int, name: str) -> bool:
    query = dns.message.make_query(name, "A")
    try:
        dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
    except (OSError, dns.exception.Timeout):
        return False
    return True


@dataclass
class _Dnsmasq:
    process: subprocess.Popen
    port: int
    log: Path


def _start(directory: Path, name: str, config: str, probe: str) -> _Dnsmasq:
    last = ""
    for _ in range(5):  # a port taken between picking and binding: pick another
        port = _free_port()
        conf = directory / f"{name}.conf"
        conf.write_text(_COMMON.format(port=port) + config)
        log = directory / f"{name}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [DNSMASQ, f"--conf-file={conf}", "--keep-in-foreground"],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if _ready(port, probe):
                return _Dnsmasq(process, port, log)
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()
        process.wait()
        last = log.read_text(errors="replace")
    raise RuntimeError(f"dnsmasq {name} did not start:\n{last}")


@dataclass
class DnsServers:
    port: int
    auth_port: int
    silent_port: int
    directory: Path
    _processes: list[_Dnsmasq] = field(default_factory=list)
    _silent: socket.socket | None = None

    @classmethod
    def start(cls, records: Sequence[str], auth_records: Sequence[str] = ()) -> DnsServers:
        directory = Path(tempfile.mkdtemp(prefix="dnsmasq-"))
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        started: list[_Dnsmasq] = []
        try:
            auth = _start(
                directory,
                "auth",
                "auth-server=ns.auth.test,127.0.0.1\nauth-zone=auth.test\n"
                + "".join(f"{line}\n" for line in auth_records),
                "auth.test",
            )
            started.append(auth)
            silent_port = silent.getsockname()[1]
            main = _start(
                directory,
                "main",
                "local=/test/\nlocal=/in-addr.arpa/\nlocal=/ip6.arpa/\n"
                f"server=/auth.test/127.0.0.1#{auth.port}\n"
                f"server=/slow.test/127.0.0.1#{silent_port}\n"
                + "".join(f"{line}\n" for line in records),
                "ready.test",
            )
            started.append(main)
        except BaseException:
            for item in started:
                item.process.kill()
                item.process.wait()
            silent.close()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return cls(
            port=main.port,
            auth_port=auth.port,
            silent_port=silent_port,
            directory=directory,
            _processes=started,
            _silent=silent,
        )

    def ask(self, name: str, rdtype: str = "A") -> tuple[str, list[str]]:
        """(rcode, answer lines) straight from the server, to check the records."""
        reply = dns.query.udp(
            dns.message.make_query(name, rdtype), "127.0.0.1", port=self.port, timeout=2
        )
        return dns.rcode.to_text(reply.rcode()), [str(rrset) for rrset in reply.answer]

    def stop(self) -> None:
        for item in self._processes:
            if item.process.poll() is None:
                item.process.terminate()
                try:
                    item.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    item.process.kill()
                    item.process.wait()
        self._processes.clear()
        if self._silent is not None:
            self._silent.close()
            self._silent = None
        shutil.rmtree(self.directory, ignore_errors=True)
