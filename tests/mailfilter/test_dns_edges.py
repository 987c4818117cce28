"""The DNS checks at their edges, against dnsmasq on loopback logging every query it gets:
internal clients that are never looked up, internationalized sender domains, and answers
of odd shapes."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shutil
import socket
import time

import pytest

from mailfilter.checks.dns import DnsChecker, internal_network
from mailfilter.profiles import parse_profile
from tests.mailfilter.conftest import RecordingPolicy
from tests.mailfilter.dnsserver import DNSMASQ, DnsServers

pytestmark = pytest.mark.skipif(
    shutil.which(DNSMASQ) is None, reason="dnsmasq is not installed (dnsmasq-base)"
)

RECORDS = [
    "log-queries",  # every query the server receives is in its log
    # A policy list that lists every address, private ranges included (as Spamhaus PBL
    # answers 127.0.0.10/11 for some): any client looked up there hits.
    "address=/pbl.test/127.0.0.10",
    # Internationalized sender domains, as DNS knows them (IDNA 2008 A-labels).
    "mx-host=xn--strae-oqa.example.test,mail.example.test,10",  # straße.example.test
    "host-record=xn--bcher-kva.example.test,192.0.2.26",  # bücher.example.test
    "host-record=mail.example.test,192.0.2.25",
    "address=/xn--strae-oqa.example.test.dbl.test/127.0.1.2",
    # A list that answers with a CNAME chain, and one that answers several codes.
    "cname=2.2.0.192.cname.test,listed.example.test",
    "host-record=listed.example.test,127.0.0.2",
    "address=/2.2.0.192.mix.test/127.0.0.2",
    "address=/2.2.0.192.mix.test/127.0.0.11",
    # RFC 2317 classless reverse delegation: the PTR is behind a CNAME.
    "cname=8.2.0.192.in-addr.arpa,8.0-25.2.0.192.in-addr.arpa",
    "ptr-record=8.0-25.2.0.192.in-addr.arpa,host8.example.test",
    # A client with more PTR records than a 512-octet UDP answer holds.
    *(
        f"ptr-record=9.2.0.192.in-addr.arpa,name{n:03d}.a-long-reverse-name.example.test"
        for n in range(60)
    ),
]

INTERNAL = [
    # address as the checks get it, the network that keeps it from being looked up
    ("127.0.0.1", "127.0.0.0/8"),
    ("127.0.0.2", "127.0.0.0/8"),
    ("0.0.0.0", "0.0.0.0/8"),
    ("10.1.2.3", "10.0.0.0/8"),
    ("172.16.0.1", "172.16.0.0/12"),
    ("172.31.255.254", "172.16.0.0/12"),
    ("192.168.1.1", "192.168.0.0/16"),
    ("100.64.0.1", "100.64.0.0/10"),
    ("100.127.255.254", "100.64.0.0/10"),
    ("169.254.1.1", "169.254.0.0/16"),
    ("224.0.0.1", "224.0.0.0/4"),
    ("::1", "::1/128"),
    ("::", "::/128"),
    ("fd12:3456::1", "fc00::/7"),
    ("fc00::1", "fc00::/7"),
    ("fe80::1", "fe80::/10"),
    ("fe80::1%eth0", "fe80::/10"),
    ("IPv6:fe80::1%eth0", "fe80::/10"),
    ("[IPv6:fd00::25]", "fc00::/7"),
    ("ff02::1", "ff00::/8"),
    ("::ffff:10.1.2.3", "10.0.0.0/8"),
    ("IPv6:::ffff:192.168.0.1", "192.168.0.0/16"),
    ("[10.1.2.3]", "10.0.0.0/8"),
]

# Documentation ranges (which Python's is_private counts as private) and the addresses
# just outside the internal networks are internet clients.
PUBLIC = [
    "192.0.2.7",
    "198.51.100.7",
    "203.0.113.7",
    "2001:db8::7",
    "::ffff:203.0.113.7",
    "11.0.0.1",
    "9.255.255.255",
    "172.32.0.1",
    "172.15.255.255",
    "192.169.0.1",
    "100.128.0.1",
    "100.63.255.255",
    "169.255.0.1",
    "2001:db8:fe80::1",
]


@pytest.fixture(scope="module")
def dns_server():
    servers = DnsServers.start(RECORDS)
    yield servers
    servers.stop()


_QUERY = re.compile(r"query\[(\w+)\] (\S+) from ")


class QueryLog:
    """The queries the server logged since this object was made."""

    def __init__(self, server: DnsServers) -> None:
        self.path = server.directory / "main.log"
        self.offset = self.path.stat().st_size

    def queries(self) -> list[tuple[str, str]]:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            text = log.read().decode(errors="replace")
        return [(name, rdtype) for rdtype, name in _QUERY.findall(text)]


def checker(server, **options) -> DnsChecker:
    """A new checker each time: its cache must not hide a query from the server's log."""
    options.setdefault("timeout", 1.0)
    options.setdefault("lifetime", 2.0)
    return DnsChecker(nameservers=[f"127.0.0.1:{server.port}"], **options)


def run(dns_checker, text, *, client_ip=None, sender="", from_domains=()):
    async def go():
        lookups = dns_checker.start(
            parse_profile(text, name="test"),
            client_ip=client_ip,
            sender=sender,
            from_domains=from_domains,
        )
        return await lookups.findings(), lookups

    return asyncio.run(go())


def reverse_names(client_ip: str) -> tuple[str, str]:
    """The block list and PTR names of a public client, as the server logs them."""
    address = ipaddress.ip_address(client_ip)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    ptr = address.reverse_pointer
    labels = ptr.rsplit(".", 2)[0]
    return f"{labels}.pbl.test", ptr


CLIENT_CHECKS = "dnsbl=5,pbl.test\nrdns_required=3,1"


# -- internal clients ------------------------------------------------------------------


@pytest.mark.parametrize(("client_ip", "network"), INTERNAL)
def test_internal_client_is_not_looked_up_and_not_listed(dns_server, client_ip, network):
    log = QueryLog(dns_server)
    findings, lookups = run(checker(dns_server), CLIENT_CHECKS, client_ip=client_ip)
    assert findings == [] and lookups.errors == []
    [note] = lookups.skipped
    assert client_ip in note and network in note
    # A documentation-range client after it is asked for, and nothing else was.
    control, _ = run(checker(dns_server), CLIENT_CHECKS, client_ip="192.0.2.7")
    assert sorted(f.name for f in control) == ["dnsbl", "rdns_required"]
    assert log.queries() == [("7.2.0.192.pbl.test", "A"), ("7.2.0.192.in-addr.arpa", "PTR")]


@pytest.mark.parametrize(("client_ip", "network"), INTERNAL)
def test_internal_network_names_the_network(client_ip, network):
    assert str(internal_network(client_ip)) == network


@pytest.mark.parametrize("client_ip", PUBLIC)
def test_documentation_and_bordering_addresses_are_looked_up(dns_server, client_ip):
    assert internal_network(client_ip) is None
    log = QueryLog(dns_server)
    findings, lookups = run(checker(dns_server), CLIENT_CHECKS, client_ip=client_ip)
    listed, ptr = reverse_names(client_ip)
    assert [(f.name, f.score) for f in findings] == [("dnsbl", 5.0), ("rdns_required", 3.0)]
    assert lookups.skipped == [] and lookups.errors == []
    assert sorted(log.queries()) == sorted([(listed, "A"), (ptr, "PTR")])


def test_an_internal_clients_sender_domain_is_still_looked_up(dns_server):
    """Only the client address is internal: the sender's domain is the internet's."""
    log = QueryLog(dns_server)
    findings, lookups = run(
        checker(dns_server),
        CLIENT_CHECKS + "\nrmx_required=2,1\ndnsbl_domain=4,dbl.test",
        client_ip="10.1.2.3",
        sender="a@nowhere.example.test",
    )
    assert [(f.name, f.score) for f in findings] == [("rmx_required", 2.0)]
    assert len(lookups.skipped) == 1
    assert sorted(log.queries()) == [
        ("nowhere.example.test", "MX"),
        ("nowhere.example.test.dbl.test", "A"),
    ]


def test_a_profile_without_client_checks_notes_nothing(dns_server):
    findings, lookups = run(
        checker(dns_server),
        "rmx_required=2,1",
        client_ip="10.1.2.3",
        sender="a@mx-less.example.test",
    )
    assert [f.name for f in findings] == ["rmx_required"]
    assert lookups.skipped == []


# -- through the worker, behind Postfix ---------------------------------------------------


def _worker(tmp_path, dns_server, start_filter):
    from mailfilter.config import FilterConfig
    from mailfilter.policy import FilterChecks

    (tmp_path / "Medium").write_text(f"reject_score=5\n{CLIENT_CHECKS}\n")
    (tmp_path / "Relay").write_text("reject_score=10\n")
    checks = FilterChecks(
        FilterConfig(profile_dir=str(tmp_path), dns_servers=(f"127.0.0.1:{dns_server.port}",))
    )
    return checks, start_filter(policy=checks.policy, lookup=checks.lookup)


def _send(worker, raw, xforward: bytes) -> bytes:
    client = raw(worker.port)
    client.reply()
    client.command(b"EHLO postfix.test")
    assert client.command(b"XFORWARD " + xforward).startswith(b"250")
    assert client.command(b"MAIL FROM:<a@mx.example.test>").startswith(b"250")
    assert client.command(b"RCPT TO:<alice@example.test>").startswith(b"250")
    assert client.command(b"DATA").startswith(b"354")
    reply = client.command(
        b"From: <a@mx.example.test>\r\nTo: alice@example.test\r\nSubject: hi\r\n"
        b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <3@mx.example.test>\r\n"
        b"\r\nhello\r\n."
    )
    client.command(b"QUIT")
    return reply


@pytest.mark.parametrize(
    "xforward",
    [
        b"NAME=host.internal ADDR=10.1.2.3 HELO=host.internal",
        b"NAME=[UNAVAILABLE] ADDR=IPV6:fe80::1%eth0",
        b"NAME=[UNAVAILABLE] ADDR=IPV6:::ffff:192.168.7.7",
        b"NAME=webmail ADDR=100.64.1.2",
        b"NAME=localhost ADDR=127.0.0.1",
        b"NAME=[UNAVAILABLE] ADDR=[UNAVAILABLE] PROTO=[UNAVAILABLE]",
    ],
)
def test_worker_asks_nothing_for_an_internal_or_unknown_client(
    dns_server, tmp_path, start_filter, raw, next_hop, xforward
):
    checks, worker = _worker(tmp_path, dns_server, start_filter)
    log = QueryLog(dns_server)
    reply = _send(worker, raw, xforward)
    assert reply.startswith(b"250"), reply
    assert checks.stats.get("verdicts", "CLEAN") == 1
    assert checks.stats.total("dns_errors") == 0
    [delivery] = next_hop.deliveries
    assert b"X-Spam-Status: No" in delivery.content
    assert b"dnsbl" not in delivery.content and b"rdns" not in delivery.content
    # The same worker still asks for an internet client, which the list names.
    assert _send(worker, raw, b"NAME=mx.remote.test ADDR=192.0.2.7").startswith(b"250")
    assert checks.stats.get("verdicts", "SPAM") == 1
    assert b"dnsbl" in next_hop.deliveries[1].content
    assert sorted(log.queries()) == [("7.2.0.192.in-addr.arpa", "PTR"), ("7.2.0.192.pbl.test", "A")]


def test_xforward_addr_unavailable_leaves_the_client_unknown(start_filter, raw):
    """Postfix names no client address (local submission): the checks must not take
    Postfix, the peer, for the client."""
    policy = RecordingPolicy()
    worker = start_filter(policy=policy)
    reply = _send(worker, raw, b"NAME=[UNAVAILABLE] ADDR=[UNAVAILABLE] HELO=[UNAVAILABLE]")
    assert reply.startswith(b"250"), reply
    [envelope] = policy.envelopes
    assert (envelope.client_address, envelope.client_name, envelope.helo) == ("", "", "")


# -- internationalized sender domains ----------------------------------------------------


def test_idn_sender_domain_is_asked_as_its_idna2008_a_label(dns_server):
    """straße.example.test is xn--strae-oqa.example.test (IDNA 2008, as Postfix and the
    registries write it), not strasse.example.test, another domain (IDNA 2003)."""
    log = QueryLog(dns_server)
    findings, lookups = run(
        checker(dns_server),
        "rmx_required=5,1\ndnsbl_domain=4,dbl.test",
        sender="a@Straße.Example.Test",
    )
    assert [(f.name, f.detail) for f in findings] == [
        ("dnsbl_domain", "xn--strae-oqa.example.test listed in dbl.test")
    ]
    assert lookups.errors == []
    queried = [name for name, _ in log.queries()]
    assert "xn--strae-oqa.example.test" in queried
    assert not any("strasse" in name for name in queried), queried


def test_idn_from_domain_and_implicit_mx(dns_server):
    findings, lookups = run(
        checker(dns_server),
        "rmx_required=5,1\ndnsbl_domain=4,dbl.test",
        sender="a@BÜCHER.example.test",
        from_domains=["straße.example.test", "xn--strae-oqa.example.test"],
    )
    # bücher has an A record only (the implicit MX); the From domain is listed once.
    assert [(f.name, f.detail) for f in findings] == [
        ("dnsbl_domain", "xn--strae-oqa.example.test listed in dbl.test")
    ]
    assert lookups.errors == []


# -- answers of odd shapes ----------------------------------------------------------------


def test_list_answering_through_a_cname_chain_hits(dns_server):
    findings, lookups = run(checker(dns_server), "dnsbl=2,cname.test", client_ip="192.0.2.2")
    assert [(f.name, f.score) for f in findings] == [("dnsbl", 2.0)]
    assert lookups.errors == []


def test_answer_with_several_codes_hits_the_lines_naming_any_of_them(dns_server):
    text = "dnsbl=1,mix.test/127.0.0.2\ndnsbl=2,mix.test/127.0.0.11\ndnsbl=4,mix.test/127.0.0.4"
    log = QueryLog(dns_server)
    findings, lookups = run(checker(dns_server), text, client_ip="192.0.2.2")
    assert sorted(f.score for f in findings) == [1.0, 2.0]
    assert lookups.errors == []
    assert log.queries() == [("2.2.0.192.mix.test", "A")]


def test_ptr_behind_a_cname_counts_as_reverse_dns(dns_server):
    findings, lookups = run(checker(dns_server), "rdns_required=3,1", client_ip="192.0.2.8")
    assert findings == [] and lookups.errors == []


def test_many_ptr_records_are_read_over_tcp(dns_server):
    log = QueryLog(dns_server)
    findings, lookups = run(checker(dns_server), "rdns_required=3,1", client_ip="192.0.2.9")
    assert findings == [] and lookups.errors == []
    # The answer did not fit into UDP: the same question came again, over TCP.
    assert log.queries() == [("9.2.0.192.in-addr.arpa", "PTR")] * 2


def test_a_resolver_that_is_down_decides_nothing_within_the_lifetime():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens
    dns_checker = DnsChecker(nameservers=[f"127.0.0.1:{port}"], timeout=0.2, lifetime=0.6)
    started = time.monotonic()
    findings, lookups = run(
        dns_checker,
        CLIENT_CHECKS + "\nrmx_required=2,1",
        client_ip="192.0.2.7",
        sender="a@mx.example.test",
    )
    assert findings == []
    assert time.monotonic() - started < 0.6 + 0.5
    assert sorted(e.check for e in lookups.errors) == ["dnsbl", "rdns_required", "rmx_required"]
