"""The directory sync and the relay map at a large directory, against a real slapd.

    .venv/bin/python bench/directory_sync.py [--objects 50000]

Builds a throw-away slapd (tests/directory/slapd.py: its schema, certificates, AD page
limit and sync account) in a temporary directory, loaded with OBJECTS objects under their
own OU: people (70 %, one in a hundred disabled), groups (10 %), contacts (15 %) and
shared mailboxes (5 %). Then, in a scratch PostgreSQL database (`<name>_bench_directory`
next to DATABASE_URL's, dropped at the end), times:

- the first sync (`sync_directory()`: every user and address created, map written),
- writing the relay map on its own (`write_relay_map()`, what `writerelaymap` does),
- a second sync with nothing changed in the directory.

The baseline is a plain paged search (python-ldap, RFC 2696, 1000 a page, over the same
LDAPS connection settings) of every entry under that OU with all its attributes, measured
in the same run; every figure is printed beside it as a ratio. Goals: first sync under
60 s, the unchanged second sync much faster than the first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# bench/ is the script's own directory, first on sys.path.
from common import drop_scratch_database, timed, use_scratch_database

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.directory.slapd import (  # noqa: E402
    CONFIG,
    ROOT_DN,
    ROOT_PW,
    SCHEMA,
    SUFFIX,
    SYNC_DN,
    SYNC_PW,
    Slapd,
    big_ldif,
    make_certificates,
)

BENCH_OU = f"ou=bench,{SUFFIX}"
SHARES = (("person", 70), ("group", 10), ("contact", 15), ("shared", 5))


def _bench_ldif(objects: int) -> str:
    """OBJECTS entries under BENCH_OU, in the proportions of SHARES."""
    entries = [f"dn: {BENCH_OU}\nobjectClass: organizationalUnit\nou: bench"]
    for kind, _ in SHARES:
        entries.append(f"dn: ou={kind},{BENCH_OU}\nobjectClass: organizationalUnit\nou: {kind}")
    counts = {kind: objects * share // 100 for kind, share in SHARES}
    counts["person"] += objects - sum(counts.values())
    for kind, count in counts.items():
        for i in range(count):
            entries.append(_entry(kind, i))
    return "\n\n".join(entries) + "\n"


def _entry(kind: str, i: int) -> str:
    guid = _b64(uuid.uuid4().bytes)
    dn = f"dn: cn={kind} {i},ou={kind},{BENCH_OU}"
    if kind in ("person", "shared"):
        name = f"{kind[0]}{i}"
        disabled = kind == "shared" or i % 100 == 7
        lines = [
            dn, "objectClass: user", "objectCategory: person", f"cn: {kind} {i}",
            f"objectGUID:: {guid}", f"sAMAccountName: {name}",
            f"userPrincipalName: {name}@corp.example.test", f"mail: {kind}{i}@example.test",
            f"proxyAddresses: SMTP:{kind}{i}@example.test",
            f"proxyAddresses: smtp:{name}@example.test",
            f"proxyAddresses: X500:/o=Example/ou=Exchange/cn=Recipients/cn={name}",
            f"userAccountControl: {514 if disabled else 512}",
        ]
        if kind == "shared":
            lines.append("msExchRecipientTypeDetails: 4")
        return "\n".join(lines)
    domain = "partner.example" if kind == "contact" else "example.test"
    return "\n".join([
        dn, f"objectClass: {kind}", f"objectCategory: {kind}", f"cn: {kind} {i}",
        f"objectGUID:: {guid}", f"mail: {kind}{i}@{domain}",
        f"proxyAddresses: SMTP:{kind}{i}@{domain}",
    ])


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_slapd(root: Path, objects: int) -> Slapd:
    """tests/directory/slapd.py's server with the bench OU loaded by slapadd."""
    import ldap

    make_certificates(root / "tls")
    (root / "data").mkdir()
    (root / "ad.schema").write_text(SCHEMA)
    conf = root / "slapd.conf"
    conf.write_text(CONFIG.format(root=root, suffix=SUFFIX, root_dn=ROOT_DN, root_pw=ROOT_PW))
    (root / "bench.ldif").write_text(big_ldif() + "\n" + _bench_ldif(objects))
    slapadd = shutil.which("slapadd") or "/usr/sbin/slapadd"
    subprocess.run([slapadd, "-q", "-f", str(conf), "-l", str(root / "bench.ldif")],
                   check=True, capture_output=True)
    ldap_port, ldaps_port = _free_port(), _free_port()
    slapd = shutil.which("slapd") or "/usr/sbin/slapd"
    urls = f"ldap://127.0.0.1:{ldap_port}/ ldaps://127.0.0.1:{ldaps_port}/"
    with open(root / "slapd.log", "wb") as log:
        # No "-d stats": a log line per operation would slow the server being measured.
        process = subprocess.Popen([slapd, "-f", str(conf), "-h", urls, "-d", "0"],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "LDAPNOINIT": "1"})
    server = Slapd(root=root, ldap_port=ldap_port, ldaps_port=ldaps_port, process=process,
                   ca_file=root / "tls" / "ca.pem",
                   untrusted_ca_file=root / "tls" / "untrusted-ca.pem")
    deadline = time.monotonic() + 30
    while True:
        try:
            server.admin().unbind_s()
            return server
        except ldap.SERVER_DOWN:
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise SystemExit("slapd did not start") from None
            time.sleep(0.05)


def _configure(server: Slapd, work: Path) -> None:
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "spamviewer.settings",
        "SPAMVIEWER_IGNORE_DOTENV": "True",
        "SPAMVIEWER_VAR_DIR": str(work / "var"),
        "LOGIN_METHOD": "ldap",
        "LDAP_SERVER": server.ldaps_url,
        "LDAP_CA_FILE": str(server.ca_file),
        "LDAP_ALLOW_INSECURE": "False",
        "LDAP_BIND_DN": SYNC_DN,
        "LDAP_BIND_PASSWORD": SYNC_PW,
        "LDAP_BASE_DN": BENCH_OU,
        "RELAY_MAP_PATH": str(work / "postfix" / "relay_recipients"),
        "RELAY_MAP_DIRECTORY_EXTRA": str(work / "postfix" / "relay_extra_directory"),
        "RELAY_MAP_POSTMAP": "hash" if shutil.which("postmap") else "none",
        "DIRECTORY_SYNC_LOCK": str(work / "directory-sync.lock"),
        "LOG_LEVEL": "WARNING",
    })


def _baseline_search(server: Slapd) -> int:
    """Every entry under BENCH_OU, all attributes, with plain python-ldap paging."""
    import ldap
    from ldap.controls import SimplePagedResultsControl

    conn = ldap.initialize(server.ldaps_url)
    conn.set_option(ldap.OPT_REFERRALS, 0)
    conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
    conn.set_option(ldap.OPT_X_TLS_CACERTFILE, str(server.ca_file))
    conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
    conn.simple_bind_s(SYNC_DN, SYNC_PW)
    control = SimplePagedResultsControl(True, size=1000, cookie=b"")
    entries = 0
    while True:
        msgid = conn.search_ext(BENCH_OU, ldap.SCOPE_SUBTREE, "(objectClass=*)",
                                serverctrls=[control])
        _, data, _, controls = conn.result3(msgid)
        entries += sum(1 for dn, _ in data if dn is not None)
        cookie = next((c.cookie for c in controls
                       if c.controlType == SimplePagedResultsControl.controlType), b"")
        if not cookie:
            break
        control.cookie = cookie
    conn.unbind_s()
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=50_000)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON line with the results at the end")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sv-bench-directory-"))
    (work / "slapd").mkdir()
    (work / "postfix").mkdir()
    print(f"building a directory of {args.objects} objects ...", flush=True)
    load_time, server = timed(lambda: _start_slapd(work / "slapd", args.objects))
    print(f"  slapadd and start: {load_time:.1f} s")
    try:
        _configure(server, work)
        use_scratch_database("bench_directory", script="bench/directory_sync.py")
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        try:
            _run(server, args.objects, as_json=args.json)
        finally:
            drop_scratch_database()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _run(server: Slapd, objects: int, *, as_json: bool = False) -> None:
    from directory.relaymap import write_relay_map
    from directory.sync import sync_directory

    baseline, entries = timed(lambda: _baseline_search(server))
    first, summary = timed(sync_directory)
    relay, result = timed(write_relay_map)
    second, again = timed(sync_directory)

    print(f"baseline: paged search of {entries} entries   {baseline:8.2f} s")
    print(f"  first sync      {first:8.2f} s   x{first / baseline:6.1f}   ({summary})")
    print(f"  relay map write {relay:8.2f} s   x{relay / baseline:6.1f}   "
          f"({result.count} keys, postmap {result.postmap_type or 'none'})")
    print(f"  unchanged sync  {second:8.2f} s   x{second / baseline:6.1f}   ({again})")
    print(f"goals: first sync under 60 s: {'met' if first < 60 else 'NOT met'}; "
          f"unchanged sync / first sync = {second / first:.2f}")
    if as_json:
        import json

        base = {"unit": "s", "baseline_name": f"paged search of {entries} entries",
                "baseline": round(baseline, 3)}
        print(json.dumps({
            "bench": "directory_sync", "cores": os.cpu_count(),
            "title": f"Directory sync, {objects:,} objects (slapd, PostgreSQL)",
            "results": [
                {"name": "first sync", "value": round(first, 3), **base, "goal": "< 60 s",
                 "met": first < 60},
                {"name": "relay map write", "value": round(relay, 3), **base},
                {"name": "unchanged sync", "value": round(second, 3), **base,
                 "goal": "much faster than the first", "met": second < first / 2},
            ],
        }))


if __name__ == "__main__":
    main()
