"""The DNS checks against a real DNS server (dnsmasq) on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import time

import dns.message
import dns.name
import dns.resolver
import dns.rrset
import pytest

from mailfilter.checks.dns import (
    DnsChecker,
    _zone_missing,
    parse_nameserver,
    reversed_address,
    sender_domain,
)
from mailfilter.profiles import parse_profile
from tests.mailfilter.conftest import RecordingPolicy
from tests.mailfilter.dnsserver import DNSMASQ, DnsServers

pytestmark = pytest.mark.skipif(
    shutil.which(DNSMASQ) is None, reason="dnsmasq is not installed (dnsmasq-base)"
)


def nibbles(address: str) -> str:
    return ".".join(reversed(ipaddress.IPv6Address(address).exploded.replace(":", "")))


LISTED_V6 = "2001:db8::2"
RECORDS = [
    # dnsbl: 192.0.2.2 listed, 192.0.2.3 answered with an error code, 192.0.2.4 listed
    # with another code, 192.0.2.5 answered outside 127/8 (an NXDOMAIN-rewriting resolver).
    # Clients are documentation addresses: internal ones (127/8...) are never looked up.
    "address=/2.2.0.192.bl.test/127.0.0.2",
    "address=/3.2.0.192.bl.test/127.255.255.254",
    "address=/4.2.0.192.bl.test/127.0.0.4",
    "address=/5.2.0.192.bl.test/192.0.2.99",
    f"address=/{nibbles(LISTED_V6)}.bl.test/127.0.0.2",
    # dnsbl_domain
    "address=/spam.example.test.dbl.test/127.0.1.2",
    "address=/phish.example.test.dbl.test/127.0.1.4",
    # reverse DNS
    "ptr-record=1.2.0.192.in-addr.arpa,host.example.test",
    f"ptr-record={nibbles('2001:db8::1')}.ip6.arpa,host6.example.test",
    # sender domains
    "mx-host=mx.example.test,mail.example.test,10",
    "host-record=mail.example.test,192.0.2.25",
    "host-record=a-only.example.test,192.0.2.10",
    "host-record=aaaa-only.example.test,2001:db8::10",
    "txt-record=txt-only.example.test,v=spf1 -all",
    "mx-host=nullmx.example.test,.,0",
    "host-record=nullmx.example.test,192.0.2.11",
]
AUTH_RECORDS = ["host-record=2.2.0.192.auth.test,127.0.0.2"]


@pytest.fixture(scope="session")
def dns_server():
    servers = DnsServers.start(RECORDS, AUTH_RECORDS)
    yield servers
    servers.stop()


def checker(server, **options) -> DnsChecker:
    options.setdefault("timeout", 1.0)
    options.setdefault("lifetime", 2.0)
    return DnsChecker(nameservers=[f"127.0.0.1:{server.port}"], **options)


def profile(text: str):
    return parse_profile(text, name="test")


def run(dns_checker, profile_text, *, client_ip="192.0.2.1", sender="", from_domains=()):
    async def go():
        lookups = dns_checker.start(
            profile(profile_text), client_ip=client_ip, sender=sender, from_domains=from_domains
        )
        return await lookups.findings(), lookups.errors

    return asyncio.run(go())


def test_the_server_answers_from_its_records(dns_server):
    assert dns_server.ask("2.2.0.192.bl.test") == (
        "NOERROR",
        ["2.2.0.192.bl.test. 0 IN A 127.0.0.2"],
    )
    assert dns_server.ask("9.2.0.192.bl.test")[0] == "NXDOMAIN"
    assert dns_server.ask("mx.example.test", "MX")[1] == [
        "mx.example.test. 0 IN MX 10 mail.example.test."
    ]


# -- dnsbl -----------------------------------------------------------------------------


def test_dnsbl_hit_scores_the_line(dns_server):
    findings, errors = run(checker(dns_server), "dnsbl=3,bl.test", client_ip="192.0.2.2")
    assert [(f.category, f.name, f.score) for f in findings] == [("SPAM", "dnsbl", 3.0)]
    assert "192.0.2.2 listed in bl.test" in findings[0].detail
    assert errors == []


def test_dnsbl_hit_with_the_named_answer(dns_server):
    findings, errors = run(
        checker(dns_server), "dnsbl=2,bl.test/127.0.0.2", client_ip="192.0.2.2"
    )
    assert [(f.name, f.score) for f in findings] == [("dnsbl", 2.0)]
    assert findings[0].detail == "192.0.2.2 listed in bl.test (127.0.0.2)"
    assert errors == []


def test_dnsbl_miss(dns_server):
    findings, errors = run(checker(dns_server), "dnsbl=3,bl.test", client_ip="192.0.2.9")
    assert findings == [] and errors == []


def test_dnsbl_answer_other_than_the_named_one_is_no_hit(dns_server):
    text = "dnsbl=2,bl.test/127.0.0.2\ndnsbl=5,bl.test/127.0.0.4"
    findings, errors = run(checker(dns_server), text, client_ip="192.0.2.4")
    assert [(f.name, f.score) for f in findings] == [("dnsbl", 5.0)]
    assert errors == []


def test_dnsbl_error_code_is_no_hit_but_counted(dns_server):
    text = "dnsbl=2,bl.test/127.0.0.2\ndnsbl=1,bl.test"
    findings, errors = run(checker(dns_server), text, client_ip="192.0.2.3")
    assert findings == []
    assert len(errors) == 1  # one query for both lines
    assert errors[0].check == "dnsbl"
    assert errors[0].query == "3.2.0.192.bl.test A"
    assert "127.255.255.254" in errors[0].reason


def test_dnsbl_answer_outside_loopback_is_no_hit_but_counted(dns_server):
    findings, errors = run(checker(dns_server), "dnsbl=1,bl.test", client_ip="192.0.2.5")
    assert findings == []
    assert [e.reason for e in errors] == ["answer outside 127.0.0.0/8 (192.0.2.99)"]


def test_dnsbl_ipv6_client_is_looked_up_by_reversed_nibbles(dns_server):
    findings, errors = run(checker(dns_server), "dnsbl=2,bl.test/127.0.0.2", client_ip=LISTED_V6)
    assert [(f.name, f.score) for f in findings] == [("dnsbl", 2.0)]
    assert errors == []
    findings, _ = run(checker(dns_server), "dnsbl=2,bl.test", client_ip="2001:db8::3")
    assert findings == []


def test_dnsbl_ipv4_mapped_client_counts_as_ipv4(dns_server):
    findings, _ = run(checker(dns_server), "dnsbl=1,bl.test", client_ip="IPv6:::ffff:192.0.2.2")
    assert [f.name for f in findings] == ["dnsbl"]


def test_the_same_list_with_several_answers_is_asked_once(dns_server):
    text = "\n".join(f"dnsbl=1,bl.test/127.0.0.{n}" for n in (2, 3, 4, 9))

    async def go():
        lookups = checker(dns_server).start(
            profile(text), client_ip="192.0.2.2", sender="", from_domains=()
        )
        queries = len(lookups._queries)
        return queries, await lookups.findings()

    queries, findings = asyncio.run(go())
    assert queries == 1
    assert [f.detail for f in findings] == ["192.0.2.2 listed in bl.test (127.0.0.2)"]


def test_list_whose_zone_does_not_exist_is_counted_not_a_miss(dns_server):
    # auth.test is a zone: a miss there is NXDOMAIN with auth.test's SOA.
    text = "dnsbl=1,auth.test"
    findings, errors = run(checker(dns_server), text, client_ip="192.0.2.2")
    assert [f.name for f in findings] == ["dnsbl"]
    findings, errors = run(checker(dns_server), text, client_ip="192.0.2.9")
    assert findings == [] and errors == []
    # gone.auth.test is no zone: NXDOMAIN with the SOA of the zone above it.
    findings, errors = run(checker(dns_server), "dnsbl=1,gone.auth.test", client_ip="192.0.2.9")
    assert findings == []
    assert [e.reason for e in errors] == ["list zone does not exist"]


def test_list_the_server_refuses_is_counted(dns_server):
    findings, errors = run(checker(dns_server), "dnsbl=1,bl.invalid", client_ip="192.0.2.2")
    assert findings == []
    assert len(errors) == 1 and "REFUSED" in errors[0].reason


def test_no_client_address_asks_nothing(dns_server):
    for client_ip in (None, "", "unknown", "[UNAVAILABLE]"):
        findings, errors = run(
            checker(dns_server), "dnsbl=1,bl.test\nrdns_required=1,1", client_ip=client_ip
        )
        assert findings == [] and errors == []


# -- timeouts --------------------------------------------------------------------------


def test_silent_list_times_out_without_a_finding_and_within_the_lifetime(dns_server):
    text = "dnsbl=1,bl.test\ndnsbl=5,slow.test\nrdns_required=2,1"
    started = time.monotonic()
    findings, errors = run(
        checker(dns_server, timeout=0.3, lifetime=0.8), text, client_ip="192.0.2.2"
    )
    elapsed = time.monotonic() - started
    assert elapsed < 0.8 + 0.5
    # bl.test answered; the PTR for 192.0.2.2 is missing; slow.test is only counted
    assert sorted(f.name for f in findings) == ["dnsbl", "rdns_required"]
    assert [(e.check, e.query) for e in errors] == [("dnsbl", "2.2.0.192.slow.test A")]
    assert errors[0].reason == "timeout"


def test_silent_name_server_bounds_the_whole_check_by_the_lifetime(dns_server):
    dns_checker = DnsChecker(
        nameservers=[f"127.0.0.1:{dns_server.silent_port}"], timeout=0.2, lifetime=0.6
    )
    text = "dnsbl=1,bl.test\ndnsbl_domain=1,dbl.test\nrdns_required=1,1\nrmx_required=1,1"
    started = time.monotonic()
    findings, errors = run(
        dns_checker, text, client_ip="192.0.2.2", sender="a@spam.example.test"
    )
    elapsed = time.monotonic() - started
    assert findings == []
    assert elapsed < 0.6 + 0.5
    assert sorted(e.check for e in errors) == [
        "dnsbl", "dnsbl_domain", "rdns_required", "rmx_required"
    ]
    assert {e.reason for e in errors} == {"timeout"}


def test_queries_run_while_the_caller_waits_for_something_else(dns_server):
    dns_checker = DnsChecker(
        nameservers=[f"127.0.0.1:{dns_server.silent_port}"], timeout=0.2, lifetime=0.5
    )

    async def go():
        lookups = dns_checker.start(
            profile("dnsbl=1,bl.test"), client_ip="192.0.2.2", sender="", from_domains=()
        )
        await asyncio.sleep(0.7)  # the message arrives meanwhile
        started = time.monotonic()
        await lookups.findings()
        return time.monotonic() - started, lookups.errors

    waited, errors = asyncio.run(go())
    assert waited < 0.2
    assert [e.reason for e in errors] == ["timeout"]


def test_cancel_drops_the_running_queries(dns_server):
    dns_checker = DnsChecker(
        nameservers=[f"127.0.0.1:{dns_server.silent_port}"], timeout=1, lifetime=5
    )

    async def go():
        lookups = dns_checker.start(
            profile("dnsbl=1,bl.test"), client_ip="192.0.2.2", sender="", from_domains=()
        )
        await asyncio.sleep(0.05)
        lookups.cancel()
        started = time.monotonic()
        findings = await lookups.findings()
        return findings, lookups.errors, time.monotonic() - started

    findings, errors, waited = asyncio.run(go())
    assert findings == [] and waited < 0.2
    assert [e.reason for e in errors] == ["cancelled"]


# -- dnsbl_domain ----------------------------------------------------------------------


def test_dnsbl_domain_hit_for_the_envelope_sender(dns_server):
    findings, errors = run(
        checker(dns_server), "dnsbl_domain=4,dbl.test", sender="<x@Spam.Example.Test>"
    )
    assert [(f.name, f.score) for f in findings] == [("dnsbl_domain", 4.0)]
    assert findings[0].detail == "spam.example.test listed in dbl.test"
    assert errors == []


def test_dnsbl_domain_miss(dns_server):
    findings, errors = run(checker(dns_server), "dnsbl_domain=4,dbl.test", sender="x@ok.test")
    assert findings == [] and errors == []


def test_dnsbl_domain_honours_the_named_answer(dns_server):
    text = "dnsbl_domain=4,dbl.test/127.0.1.2\ndnsbl_domain=6,dbl.test/127.0.1.4"
    findings, _ = run(checker(dns_server), text, sender="x@phish.example.test")
    assert [(f.name, f.score) for f in findings] == [("dnsbl_domain", 6.0)]
    findings, _ = run(checker(dns_server), text, sender="x@spam.example.test")
    assert [(f.name, f.score) for f in findings] == [("dnsbl_domain", 4.0)]


def test_dnsbl_domain_looks_up_the_from_domains_once_per_list(dns_server):
    text = "dnsbl_domain=4,dbl.test"
    findings, _ = run(
        checker(dns_server),
        text,
        sender="x@ok.test",
        from_domains=["phish.example.test", "spam.example.test", "ok.test"],
    )
    assert [(f.name, f.score) for f in findings] == [("dnsbl_domain", 4.0)]
    assert findings[0].detail == "phish.example.test, spam.example.test listed in dbl.test"


def test_from_domains_can_be_added_after_the_start(dns_server):
    async def go():
        lookups = checker(dns_server).start(
            profile("dnsbl_domain=4,dbl.test"), client_ip=None, sender="", from_domains=()
        )
        lookups.add_from_domains(["spam.example.test", "[192.0.2.1]", "no..dots"])
        return await lookups.findings(), lookups.errors

    findings, errors = asyncio.run(go())
    assert [f.detail for f in findings] == ["spam.example.test listed in dbl.test"]
    assert errors == []


# -- rdns_required ---------------------------------------------------------------------


def test_rdns_present(dns_server):
    findings, errors = run(checker(dns_server), "rdns_required=2,1", client_ip="192.0.2.1")
    assert findings == [] and errors == []


def test_rdns_absent_scores(dns_server):
    findings, errors = run(checker(dns_server), "rdns_required=2,1", client_ip="192.0.2.9")
    assert [(f.name, f.score, f.detail) for f in findings] == [
        ("rdns_required", 2.0, "no reverse DNS (PTR) for 192.0.2.9")
    ]
    assert errors == []


def test_rdns_for_ipv6(dns_server):
    findings, _ = run(checker(dns_server), "rdns_required=2,1", client_ip="2001:db8::1")
    assert findings == []
    findings, _ = run(checker(dns_server), "rdns_required=2,1", client_ip="2001:db8::9")
    assert [f.name for f in findings] == ["rdns_required"]


def test_rdns_off_by_default(dns_server):
    findings, errors = run(checker(dns_server), "reject_score=5", client_ip="192.0.2.9")
    assert findings == [] and errors == []


# -- rmx_required ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sender", ["a@mx.example.test", "a@a-only.example.test", "<a@AAAA-only.example.test.>"]
)
def test_rmx_present(dns_server, sender):
    findings, errors = run(checker(dns_server), "rmx_required=5,1", sender=sender)
    assert findings == [] and errors == []


@pytest.mark.parametrize(
    "sender", ["a@nowhere.example.test", "a@txt-only.example.test", "a@nullmx.example.test"]
)
def test_rmx_absent_scores(dns_server, sender):
    findings, errors = run(checker(dns_server), "rmx_required=5,1", sender=sender)
    assert [(f.name, f.score) for f in findings] == [("rmx_required", 5.0)]
    assert sender.partition("@")[2] in findings[0].detail
    assert errors == []


@pytest.mark.parametrize("sender", ["", "<>", None, "postmaster", "a@[192.0.2.1]"])
def test_null_sender_and_address_literals_are_skipped(dns_server, sender):
    text = "rmx_required=5,1\ndnsbl_domain=1,dbl.test"
    findings, errors = run(checker(dns_server), text, sender=sender)
    assert findings == [] and errors == []


def test_rmx_of_a_silent_domain_is_counted_not_scored(dns_server):
    findings, errors = run(
        checker(dns_server, timeout=0.2, lifetime=0.5), "rmx_required=5,1", sender="a@slow.test"
    )
    assert findings == []
    assert [(e.check, e.query) for e in errors] == [("rmx_required", "slow.test MX")]


def test_a_second_transaction_is_judged_the_same_from_the_cache(dns_server):
    dns_checker = checker(dns_server)
    text = "dnsbl=1,gone.auth.test\ndnsbl=2,bl.test\nrdns_required=1,1\nrmx_required=1,1"
    results = [
        run(dns_checker, text, client_ip="192.0.2.2", sender="a@nowhere.example.test")
        for _ in range(2)
    ]
    assert results[0] == results[1]
    findings, errors = results[0]
    assert sorted(f.name for f in findings) == ["dnsbl", "rdns_required", "rmx_required"]
    assert [e.reason for e in errors] == ["list zone does not exist"]


# -- helpers ---------------------------------------------------------------------------


def test_reversed_address():
    assert reversed_address("192.0.2.7") == ("7.2.0.192", "in-addr.arpa")
    assert reversed_address("2001:db8::1") == (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2",
        "ip6.arpa",
    )
    assert reversed_address("IPv6:2001:DB8::1") == reversed_address("2001:db8::1")
    assert reversed_address("[IPv6:2001:DB8::1]") == reversed_address("2001:db8::1")
    assert reversed_address("[192.0.2.7]") == ("7.2.0.192", "in-addr.arpa")
    assert reversed_address("fe80::1%eth0")[1] == "ip6.arpa"
    assert reversed_address("::ffff:192.0.2.7") == ("7.2.0.192", "in-addr.arpa")
    assert reversed_address("nonsense") is None


def test_sender_domain():
    assert sender_domain("<A@Example.ORG.>") == "example.org"
    assert sender_domain("a@b@example.org") == "example.org"
    assert sender_domain("") is None
    assert sender_domain("<>") is None
    assert sender_domain("a@localhost") is None
    assert sender_domain("a@[192.0.2.1]") is None


def test_parse_nameserver():
    assert parse_nameserver("192.0.2.1") == ("192.0.2.1", 53)
    assert parse_nameserver("192.0.2.1:5353") == ("192.0.2.1", 5353)
    assert parse_nameserver("2001:db8::1") == ("2001:db8::1", 53)
    assert parse_nameserver("[2001:db8::1]:5353") == ("2001:db8::1", 5353)
    assert parse_nameserver("192.0.2.1", port=54) == ("192.0.2.1", 54)
    for bad in ("dns.example", "192.0.2.1:0", "[2001:db8::1]x", "192.0.2.1:port"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)


def test_zone_missing_reads_the_soa_of_the_nxdomain():
    def nxdomain(soa_owner: str):
        response = dns.message.make_response(dns.message.make_query("x.bl.example", "A"))
        response.authority.append(
            dns.rrset.from_text(soa_owner, 60, "IN", "SOA", "ns. host. 1 2 3 4 5")
        )
        qname = dns.name.from_text("x.bl.example")
        return dns.resolver.NXDOMAIN(qnames=[qname], responses={qname: response})

    zone = dns.name.from_text("bl.example")
    assert _zone_missing(nxdomain("bl.example."), zone) is False
    assert _zone_missing(nxdomain("sub.bl.example."), zone) is False
    assert _zone_missing(nxdomain("example."), zone) is True
    assert _zone_missing(nxdomain("."), zone) is True


# -- wired into the worker's policy -------------------------------------------------------


def _checks_with_dns(tmp_path, servers: tuple[str, ...]):
    from mailfilter.config import FilterConfig
    from mailfilter.policy import FilterChecks

    (tmp_path / "Medium").write_text("reject_score=5\ndnsbl=6,bl.test/127.0.0.2\n")
    (tmp_path / "Relay").write_text("reject_score=10\n")
    return FilterChecks(FilterConfig(profile_dir=str(tmp_path), dns_servers=servers))


def _decide(checks, client_ip: str):
    from mailfilter.policy import Envelope

    raw = (b"From: a@remote.example\r\nTo: alice@example.test\r\nSubject: hi\r\n"
           b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@remote.example>\r\n"
           b"\r\nhello\r\n")
    envelope = Envelope(sender="a@remote.example", recipients=("alice@example.test",),
                        client_address=client_ip)

    async def go():
        profile = await checks.lookup.profile_for("alice@example.test")
        return await checks.policy.decide(raw, envelope, profile)

    return asyncio.run(go())


def test_a_listed_client_makes_the_message_spam_through_the_worker_policy(dns_server, tmp_path):
    checks = _checks_with_dns(tmp_path, (f"127.0.0.1:{dns_server.port}",))
    listed = _decide(checks, "192.0.2.2")
    assert listed.category == "SPAM"
    assert any(f.name == "dnsbl" and f.score == 6.0 for f in listed.findings)
    assert _decide(checks, "192.0.2.9").category is None


def test_without_dns_servers_the_profiles_dns_lines_ask_nothing(dns_server, tmp_path):
    checks = _checks_with_dns(tmp_path, ())
    assert checks.policy.dns_checks is None
    assert _decide(checks, "192.0.2.2").category is None


def test_dns_errors_are_counted_in_the_statistics(dns_server, tmp_path):
    checks = _checks_with_dns(tmp_path, (f"127.0.0.1:{dns_server.port}",))
    (tmp_path / "Medium").write_text("reject_score=5\ndnsbl=6,no-such-zone.auth.test\n")
    checks.reload()
    _decide(checks, "192.0.2.2")
    assert checks.stats.get("dns_errors", "dnsbl") == 1
    assert 'spamviewer_filter_dns_errors_total{check="dnsbl"} 1' in checks.stats.render()


class _RecordingProxy:
    """A UDP name server in front of dnsmasq that notes when each query arrives."""

    def __init__(self, upstream_port: int) -> None:
        import socket
        import threading

        self.upstream_port = upstream_port
        self.arrivals: list[tuple[float, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import dns.query

        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            self.arrivals.append((time.monotonic(), query.question[0].name.to_text()))
            reply = dns.query.udp(query, "127.0.0.1", port=self.upstream_port, timeout=2)
            self.sock.sendto(reply.to_wire(), peer)

    def first(self, name: str) -> float | None:
        return next((at for at, text in self.arrivals if text == name), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_the_worker_sends_its_queries_before_the_data_command(
    dns_server, tmp_path, start_filter, raw
):
    from mailfilter.config import FilterConfig
    from mailfilter.policy import FilterChecks

    proxy = _RecordingProxy(dns_server.port)
    try:
        (tmp_path / "Medium").write_text(
            "reject_score=5\ndnsbl=1,bl.test\nrmx_required=1,1\ndnsbl_domain=6,dbl.test\n"
        )
        (tmp_path / "Relay").write_text("reject_score=10\n")
        checks = FilterChecks(
            FilterConfig(profile_dir=str(tmp_path), dns_servers=(f"127.0.0.1:{proxy.port}",))
        )
        worker = start_filter(policy=checks.policy, lookup=checks.lookup)
        client = raw(worker.port)
        client.reply()
        client.command(b"EHLO postfix.test")
        # Behind Postfix: the client is the one XFORWARD names, not the loopback peer.
        assert client.command(b"XFORWARD ADDR=192.0.2.1").startswith(b"250")
        assert client.command(b"MAIL FROM:<a@mx.example.test>").startswith(b"250")
        assert client.command(b"RCPT TO:<alice@example.test>").startswith(b"250")
        early = ("1.2.0.192.bl.test.", "mx.example.test.", "mx.example.test.dbl.test.")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and None in map(proxy.first, early):
            time.sleep(0.02)
        data_sent = time.monotonic()
        assert client.command(b"DATA").startswith(b"354")
        reply = client.command(
            b"From: <b@spam.example.test>\r\nTo: alice@example.test\r\nSubject: hi\r\n"
            b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <2@remote.example>\r\n"
            b"\r\nhello\r\n."
        )
        assert reply.startswith(b"250"), reply
        for name in early:
            arrived = proxy.first(name)
            assert arrived is not None and arrived < data_sent, name
        # The From header's domain is known only after DATA, and each query is sent once.
        assert proxy.first("spam.example.test.dbl.test.") > data_sent
        assert [text for _, text in proxy.arrivals].count("1.2.0.192.bl.test.") == 1
        assert checks.stats.get("verdicts", "SPAM") == 1
    finally:
        proxy.stop()


def test_what_the_policy_prepared_is_cancelled_on_rset_and_quit_and_used_after_data(
    start_filter, raw
):
    class Prepared:
        def __init__(self, envelope) -> None:
            self.envelope = envelope
            self.cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    class Preparing:
        def __init__(self) -> None:
            self.prepared: list[Prepared] = []
            self.decided_with: list[Prepared | None] = []

        def prepare(self, envelope, profile):
            self.prepared.append(Prepared(envelope))
            return self.prepared[-1]

        async def decide(self, message, envelope, profile, *, prepared=None):
            from mailfilter.policy import CLEAN

            self.decided_with.append(prepared)
            return CLEAN

    policy = Preparing()
    worker = start_filter(policy=policy)
    client = raw(worker.port)
    client.reply()
    client.command(b"EHLO client.test")
    for _ in range(2):
        client.command(b"MAIL FROM:<a@remote.example>")
        client.command(b"RCPT TO:<alice@example.test>")
        client.command(b"RCPT TO:<bob@example.test>")
        assert client.command(b"RSET").startswith(b"250")
    assert len(policy.prepared) == 2 and all(p.cancelled for p in policy.prepared)
    assert policy.prepared[0].envelope.sender == "a@remote.example"
    assert policy.prepared[0].envelope.client_address == "127.0.0.1"

    client.command(b"MAIL FROM:<a@remote.example>")
    client.command(b"RCPT TO:<alice@example.test>")
    client.command(b"DATA")
    assert client.command(b"Subject: hi\r\n\r\nhello\r\n.").startswith(b"250")
    assert policy.decided_with == [policy.prepared[2]]

    client.command(b"MAIL FROM:<a@remote.example>")
    client.command(b"RCPT TO:<alice@example.test>")
    assert not policy.prepared[3].cancelled
    client.command(b"QUIT")
    deadline = time.monotonic() + 3
    while not policy.prepared[3].cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert policy.prepared[3].cancelled


def test_behind_postfix_the_checks_see_the_client_postfix_names_in_xforward(start_filter, raw):
    """Behind Postfix the worker's peer is Postfix itself (127.0.0.1): the checks, the DNS
    block lists above all, must get the client Postfix names in XFORWARD (address, name,
    HELO), or they would look up Postfix and never find a listed sender."""
    policy = RecordingPolicy()
    worker = start_filter(policy=policy)
    client = raw(worker.port)
    client.reply()
    client.command(b"EHLO postfix.test")
    assert client.command(
        b"XFORWARD NAME=mx.remote.example ADDR=IPV6:2001:db8::25 HELO=mx.remote.example"
    ).startswith(b"250")
    client.command(b"MAIL FROM:<a@remote.example>")
    client.command(b"RCPT TO:<alice@example.test>")
    client.command(b"DATA")
    assert client.command(b"Subject: hi\r\n\r\nhello\r\n.").startswith(b"250")
    [envelope] = policy.envelopes
    assert (envelope.client_address, envelope.client_name, envelope.helo) == (
        "2001:db8::25", "mx.remote.example", "mx.remote.example")
