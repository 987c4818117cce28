"""A throw-away OpenLDAP slapd that looks enough like Active Directory for our tests.

- its own slapd.conf, schema, database and certificates under a temporary directory;
- plain LDAP (with StartTLS) and LDAPS, each on an ephemeral loopback port;
- a server certificate for 127.0.0.1 signed by a CA made here, plus an unrelated CA
  that must not be trusted;
- the attributes and object classes the sync reads, with Microsoft's OIDs where they are
  standard and matching rules that make filters work (the schema Debian ships has none);
- AD's paging limit: at most 1000 entries per search unless the simple paged results
  control is used, so that code which forgets paging fails here as on Windows;
- a sync account that is not the root DN (the root DN ignores limits).

The bulk test data is loaded with slapadd before the server starts; tests that change the
directory add their own organisational unit through python-ldap.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import ldap
import ldap.modlist

SUFFIX = "dc=example,dc=test"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "root secret"
SYNC_DN = f"cn=sync,ou=service,{SUFFIX}"
SYNC_PW = "sync account secret"
BIG_OU = f"ou=big,{SUFFIX}"
BIG_PEOPLE = 5000
# The certificate names the loopback address only: libldap replaces the name "localhost"
# with the machine's host name before checking it, so "localhost" is the wrong host here.
SERVER_NAME = "127.0.0.1"
WRONG_SERVER_NAME = "localhost"
PASSWORD = "Directory password 1"

SCHEMA = """
# Active Directory attributes with Microsoft's OIDs, given matching rules so that filters
# work. The Exchange ones live under OpenLDAP's experimental arc (test use only).
attributetype ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.656 NAME 'userPrincipalName'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.8 NAME 'userAccountControl'
    EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.2.210 NAME 'proxyAddresses'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
attributetype ( 1.2.840.113556.1.4.782 NAME 'objectCategory'
    EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.2 NAME 'objectGUID'
    EQUALITY octetStringMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.40 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.4203.666.11.901.1 NAME 'msExchHideFromAddressLists'
    EQUALITY booleanMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.7 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.4203.666.11.901.2 NAME 'msExchRecipientTypeDetails'
    EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
objectclass ( 1.2.840.113556.1.5.9 NAME 'user' SUP top STRUCTURAL MUST cn
    MAY ( sAMAccountName $ userPrincipalName $ userAccountControl $ proxyAddresses $
          objectCategory $ objectGUID $ msExchHideFromAddressLists $
          msExchRecipientTypeDetails $ mail $ userPassword $ sn $ givenName $
          displayName ) )
objectclass ( 1.2.840.113556.1.3.30 NAME 'computer' SUP user STRUCTURAL )
objectclass ( 1.2.840.113556.1.5.8 NAME 'group' SUP top STRUCTURAL MUST cn
    MAY ( sAMAccountName $ proxyAddresses $ objectCategory $ objectGUID $ mail $
          displayName $ member $ msExchHideFromAddressLists ) )
objectclass ( 1.2.840.113556.1.5.15 NAME 'contact' SUP top STRUCTURAL MUST cn
    MAY ( proxyAddresses $ objectCategory $ objectGUID $ mail $ displayName $
          msExchHideFromAddressLists ) )
objectclass ( 1.3.6.1.4.1.4203.666.11.901.3 NAME 'publicFolder' SUP top STRUCTURAL
    MUST cn MAY ( proxyAddresses $ objectCategory $ objectGUID $ mail $ displayName $
          msExchHideFromAddressLists ) )
"""

CONFIG = """
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include {root}/ad.schema
pidfile {root}/slapd.pid
argsfile {root}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile {root}/tls/ca.pem
TLSCertificateFile {root}/tls/server.pem
TLSCertificateKeyFile {root}/tls/server.key
sizelimit 1000

database mdb
suffix "{suffix}"
rootdn "{root_dn}"
rootpw "{root_pw}"
directory {root}/data
maxsize 1073741824
index objectClass eq
index mail,proxyAddresses,userPrincipalName,sAMAccountName eq
# Active Directory's MaxPageSize: plain searches stop at 1000, paged ones get everything.
limits * size.soft=1000 size.hard=1000 size.pr=1000 size.prtotal=unlimited
access to attrs=userPassword by anonymous auth by * none
access to * by users read by * none
"""


@dataclass
class Slapd:
    root: Path
    ldap_port: int
    ldaps_port: int
    process: subprocess.Popen
    ca_file: Path
    untrusted_ca_file: Path
    _ous: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def ldap_url(self) -> str:
        return f"ldap://{SERVER_NAME}:{self.ldap_port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{SERVER_NAME}:{self.ldaps_port}"

    def admin(self) -> ldap.ldapobject.LDAPObject:
        conn = ldap.initialize(f"ldap://127.0.0.1:{self.ldap_port}")
        conn.set_option(ldap.OPT_REFERRALS, 0)
        conn.simple_bind_s(ROOT_DN, ROOT_PW)
        return conn

    def new_ou(self) -> str:
        """An empty organisational unit of the test's own."""
        dn = f"ou=t{next(self._ous)}-{uuid.uuid4().hex[:8]},{SUFFIX}"
        conn = self.admin()
        try:
            conn.add_s(dn, ldap.modlist.addModlist(
                {"objectClass": [b"organizationalUnit"], "ou": [dn[3:].split(",")[0].encode()]}
            ))
        finally:
            conn.unbind_s()
        return dn

    def add(self, dn: str, attrs: dict[str, list]) -> str:
        conn = self.admin()
        try:
            conn.add_s(dn, ldap.modlist.addModlist(_encode(attrs)))
        finally:
            conn.unbind_s()
        return dn

    def modify(self, dn: str, changes: dict[str, list | None]) -> None:
        conn = self.admin()
        try:
            conn.modify_s(dn, [
                (ldap.MOD_REPLACE, name, None if values is None else _encode_values(values))
                for name, values in changes.items()
            ])
        finally:
            conn.unbind_s()

    def rename(self, dn: str, new_rdn: str) -> str:
        conn = self.admin()
        try:
            conn.rename_s(dn, new_rdn)
        finally:
            conn.unbind_s()
        return f"{new_rdn},{dn.split(',', 1)[1]}"

    def delete(self, dn: str) -> None:
        conn = self.admin()
        try:
            conn.delete_s(dn)
        finally:
            conn.unbind_s()

    def binds(self) -> list[str]:
        """The BIND operations slapd has logged so far, e.g. 'BIND dn="cn=..." method=128'."""
        text = (self.root / "slapd.log").read_text(errors="replace")
        return re.findall(r"BIND dn=\"[^\"]*\" method=\d+", text)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def person(
    cn: str,
    *,
    mail: str | None = None,
    proxy: list[str] = (),
    disabled: bool = False,
    recipient_type: int | None = None,
    upn: str | None = None,
    sam: str | None = None,
    password: str | None = PASSWORD,
    guid: bytes | None = None,
) -> dict[str, list]:
    """The attributes of an AD user object (a person)."""
    attrs: dict[str, list] = {
        "objectClass": ["user"],
        "objectCategory": ["person"],
        "cn": [cn],
        "objectGUID": [guid or uuid.uuid4().bytes],
        "userAccountControl": [str(514 if disabled else 512)],
        "sAMAccountName": [sam or cn.replace(" ", ".")[:20]],
    }
    if mail:
        attrs["mail"] = [mail]
    if proxy:
        attrs["proxyAddresses"] = list(proxy)
    if upn:
        attrs["userPrincipalName"] = [upn]
    if password:
        attrs["userPassword"] = [password]
    if recipient_type is not None:
        attrs["msExchRecipientTypeDetails"] = [str(recipient_type)]
    return attrs


def mail_object(kind: str, cn: str, *, mail: str | None = None, proxy: list[str] = ()):
    """A group, contact or publicFolder with its addresses."""
    attrs: dict[str, list] = {
        "objectClass": [kind],
        "objectCategory": [kind],
        "cn": [cn],
        "objectGUID": [uuid.uuid4().bytes],
    }
    if mail:
        attrs["mail"] = [mail]
    if proxy:
        attrs["proxyAddresses"] = list(proxy)
    return attrs


def _encode_values(values: list) -> list[bytes]:
    return [v if isinstance(v, bytes) else str(v).encode() for v in values]


def _encode(attrs: dict[str, list]) -> dict[str, list[bytes]]:
    return {name: _encode_values(values) for name, values in attrs.items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(tls: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 it signs, and an unrelated CA."""
    tls.mkdir()
    for ca in ("ca", "untrusted-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", f"/CN=spamviewer test {ca}", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.pem", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=tls)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={SERVER_NAME}",
             "-keyout", "server.key", "-out", "server.csr", cwd=tls)
    (tls / "server.ext").write_text(
        f"subjectAltName=IP:{SERVER_NAME}\nextendedKeyUsage=serverAuth\n"
        "basicConstraints=CA:FALSE\n"
    )
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.pem",
             cwd=tls)


def big_ldif() -> str:
    """The base tree, the sync account and the 5,000-person organisation."""
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example",
        f"dn: ou=service,{SUFFIX}\nobjectClass: organizationalUnit\nou: service",
        f"dn: {SYNC_DN}\nobjectClass: person\ncn: sync\nsn: sync\nuserPassword: {SYNC_PW}",
        f"dn: {BIG_OU}\nobjectClass: organizationalUnit\nou: big",
    ]
    for kind in ("people", "groups", "contacts", "folders"):
        entries.append(f"dn: ou={kind},{BIG_OU}\nobjectClass: organizationalUnit\nou: {kind}")
    for i in range(BIG_PEOPLE):
        guid = uuid.UUID(int=i + 1).bytes
        lines = [
            f"dn: cn=Person {i},ou=people,{BIG_OU}",
            "objectClass: user", "objectCategory: person", f"cn: Person {i}",
            f"objectGUID:: {_b64(guid)}", f"sAMAccountName: p{i}",
            f"userPrincipalName: p{i}@corp.example.test",
            f"mail: person{i}@example.test",
            f"proxyAddresses: SMTP:person{i}@example.test",
            f"proxyAddresses: smtp:p{i}@example.test",
            f"proxyAddresses: X500:/o=Example/ou=Exchange/cn=Recipients/cn=p{i}",
            f"proxyAddresses: SIP:person{i}@example.test",
        ]
        if i % 100 == 7:
            lines.append("userAccountControl: 514")  # someone who left
        elif i % 100 == 8:
            lines += ["userAccountControl: 514", "msExchRecipientTypeDetails: 4"]  # shared
        elif i % 100 == 9:
            lines += ["userAccountControl: 66050", "msExchRecipientTypeDetails: 16"]  # room
        else:
            lines.append("userAccountControl: 512")
        entries.append("\n".join(lines))
    for i in range(BIG_PEOPLE // 50):
        entries.append("\n".join([
            f"dn: cn=Group {i},ou=groups,{BIG_OU}", "objectClass: group",
            "objectCategory: group", f"cn: Group {i}", f"mail: group{i}@example.test",
            f"proxyAddresses: SMTP:group{i}@example.test",
        ]))
        entries.append("\n".join([
            f"dn: cn=Contact {i},ou=contacts,{BIG_OU}", "objectClass: contact",
            # AD files contacts under objectCategory=person too: only objectClass=user
            # tells people apart.
            "objectCategory: person", f"cn: Contact {i}", f"mail: contact{i}@partner.example",
            f"proxyAddresses: SMTP:contact{i}@partner.example",
            f"proxyAddresses: smtp:contact{i}@example.test",
        ]))
    for i in range(10):
        entries.append("\n".join([
            f"dn: cn=Folder {i},ou=folders,{BIG_OU}", "objectClass: publicFolder",
            "objectCategory: publicFolder", f"cn: Folder {i}",
            f"proxyAddresses: SMTP:folder{i}@example.test",
        ]))
    # A computer account: objectClass=user but not a person. It must never become a user.
    entries.append("\n".join([
        f"dn: cn=WS01,ou=people,{BIG_OU}", "objectClass: computer",
        "objectCategory: computer", "cn: WS01", "mail: ws01@example.test",
        "userAccountControl: 4096",
    ]))
    return "\n\n".join(entries) + "\n"


def big_ldif_expected() -> dict[str, set[str]]:
    """What the sync must find in the big organisation."""
    users: set[str] = set()
    disabled: set[str] = set()
    shared: set[str] = set()
    for i in range(BIG_PEOPLE):
        if i % 100 == 7:
            disabled.add(f"person{i}@example.test")
        elif i % 100 in (8, 9):
            shared.add(f"person{i}@example.test")
        else:
            users.add(f"person{i}@example.test")
    others = {f"group{i}@example.test" for i in range(BIG_PEOPLE // 50)}
    others |= {f"contact{i}@partner.example" for i in range(BIG_PEOPLE // 50)}
    others |= {f"contact{i}@example.test" for i in range(BIG_PEOPLE // 50)}
    others |= {f"folder{i}@example.test" for i in range(10)}
    return {"users": users, "disabled": disabled, "shared": shared, "others": others}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def start_slapd(root: Path) -> Slapd:
    for tool in ("slapd", "slapadd", "openssl"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise RuntimeError(f"{tool} is not installed (see apt-packages.txt)")
    root = Path(root)
    make_certificates(root / "tls")
    (root / "data").mkdir()
    (root / "ad.schema").write_text(SCHEMA)
    conf = root / "slapd.conf"
    conf.write_text(CONFIG.format(root=root, suffix=SUFFIX, root_dn=ROOT_DN, root_pw=ROOT_PW))
    (root / "big.ldif").write_text(big_ldif())
    slapadd = shutil.which("slapadd") or "/usr/sbin/slapadd"
    subprocess.run([slapadd, "-q", "-f", str(conf), "-l", str(root / "big.ldif")],
                   check=True, capture_output=True)
    ldap_port, ldaps_port = _free_port(), _free_port()
    slapd = shutil.which("slapd") or "/usr/sbin/slapd"
    urls = f"ldap://127.0.0.1:{ldap_port}/ ldaps://127.0.0.1:{ldaps_port}/"
    with open(root / "slapd.log", "wb") as log:
        process = subprocess.Popen(
            # -d stats: one log line per operation, which lets tests count binds.
            [slapd, "-f", str(conf), "-h", urls, "-d", "stats"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LDAPNOINIT": "1"},
        )
    server = Slapd(root=root, ldap_port=ldap_port, ldaps_port=ldaps_port, process=process,
                   ca_file=root / "tls" / "ca.pem",
                   untrusted_ca_file=root / "tls" / "untrusted-ca.pem")
    deadline = time.monotonic() + 20
    while True:
        try:
            server.admin().unbind_s()
            break
        except ldap.SERVER_DOWN:
            if process.poll() is not None or time.monotonic() > deadline:
                output = (root / "slapd.log").read_text()[-2000:]
                server.stop()
                raise RuntimeError(f"slapd did not start: {output}") from None
            time.sleep(0.05)
    return server
