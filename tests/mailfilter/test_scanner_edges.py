"""Edge cases of the clamd, spamd and DNS clients: scanners that stall, answer oddly or
lie, and what the policy makes of them."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from email.message import EmailMessage

import pytest

from mailfilter.checks.clamd import ClamdClient, ClamdResult
from mailfilter.checks.dns import DnsChecker
from mailfilter.checks.spamd import SpamdClient, SpamResult
from mailfilter.policy import CheckPolicy, Envelope
from mailfilter.profiles import parse_profile
from tests.mailfilter.dnsserver import DNSMASQ, DnsServers

ENVELOPE = Envelope(sender="sender@remote.example", recipients=("alice@example.test",))
NO_SIGNATURES = parse_profile("virus_destiny=discard\n", name="clamd-only")

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def multipart_message() -> bytes:
    mail = EmailMessage()
    mail["From"] = "Sender <sender@remote.example>"
    mail["To"] = "alice@example.test"
    mail["Subject"] = "files"
    mail.set_content("See the attachments.\n")
    for index in range(3):
        mail.add_attachment(b"data %d" % index, maintype="application",
                            subtype="octet-stream", filename=f"f{index}.bin")
    return mail.as_bytes(policy=mail.policy.clone(linesep="\r\n"))


@pytest.fixture
def stalled_port() -> Iterator[int]:
    """A port whose connections are accepted by the kernel but never read (a stopped
    daemon): the client's writes fill the socket buffers and then block."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield listener.getsockname()[1]
    listener.close()


async def _bounded(awaitable: Awaitable, limit: float):
    """The result of `awaitable`, or "hang" when it did not finish within `limit`."""
    try:
        return await asyncio.wait_for(awaitable, limit)
    except TimeoutError:
        return "hang"


async def _serve(handler: Handler, use: Callable[[int], Awaitable]):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await use(port)
    finally:
        server.close()
        await server.wait_closed()


# -- clamd ----------------------------------------------------------------------------


def test_clamd_that_stops_reading_mid_stream_times_out_within_its_timeout(stalled_port):
    """A clamd that accepts but never reads: the scan is an error after about `timeout`
    seconds; closing the connection with unsent data must not wait for the peer."""
    client = ClamdClient(port=stalled_port, timeout=0.5, max_stream=64 * 1024 * 1024)
    started = time.monotonic()
    result = asyncio.run(_bounded(client.scan(b"A" * (48 * 1024 * 1024)), 5))
    assert result != "hang", "the scan did not end within 10x its timeout"
    assert result.status == "error" and "timed out" in result.reason
    assert time.monotonic() - started < 3


def fake_clamd(reply: bytes) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(len(b"zINSTREAM\0"))
            writer.write(reply)
            await writer.drain()
        finally:
            writer.close()

    return handle


def _scan_reply(reply: bytes) -> ClamdResult:
    return asyncio.run(
        _serve(fake_clamd(reply), lambda port: ClamdClient(port=port, timeout=5).scan(b"x"))
    )


def test_a_detection_on_any_line_of_a_multi_line_reply_is_found():
    """A reply of several lines where one reports a virus is a detection, not a scan
    error: a virus must not reach the virus_scan_fail policy (which may pass it)."""
    result = _scan_reply(b"stream: OK\nstream: Eicar-Test-Signature FOUND\0")
    assert result.status == "found"
    assert result.names == ("Eicar-Test-Signature",)


@pytest.mark.parametrize(
    "reply",
    [
        b"stream: OK\nstream: OK\0",
        b"Eicar FOUND\n: OK\0",
        b"stream: OK\nINSTREAM size limit exceeded. ERROR\0",
    ],
)
def test_a_multi_line_reply_without_a_detection_is_an_error_never_clean(reply):
    """Several lines in one INSTREAM reply are not a clear OK: the result is an error."""
    assert _scan_reply(reply).status == "error"


@pytest.mark.parametrize(
    ("reply", "name"),
    [
        (b"stream: Win.Test.EICAR HDB-1 FOUND\0", "Win.Test.EICAR HDB-1"),
        (b"stream: Sig:With:Colons FOUND\0", "Sig:With:Colons"),
        (b"stream: OK FOUND\0", "OK"),
    ],
)
def test_names_with_spaces_or_colons_are_found(reply, name):
    """The name is everything between `stream: ` and ` FOUND`."""
    assert _scan_reply(reply).names == (name,)


def test_a_hung_clamd_gives_the_virus_scan_fail_policy_for_a_multipart_message():
    """clamd accepting but never answering: with virus_scan_fail=pass-with-header the
    message is delivered marked unscanned, whatever the number of parts it has, because
    the clamd timeout bounds the scan of the whole message (not of each part), and so
    stays within the policy's overall timeout."""

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            while await reader.read(65536):
                pass
            await asyncio.sleep(30)
        finally:
            writer.close()

    async def use(port: int):
        policy = CheckPolicy(clamd=ClamdClient(port=port, timeout=1.0),
                             virus_scan_fail="pass-with-header", timeout=2.5)
        return await policy.decide(multipart_message(), ENVELOPE, NO_SIGNATURES)

    verdict = asyncio.run(_serve(never_answer, use))
    assert verdict.destiny == "pass"
    assert dict(verdict.headers)["X-Virus-Status"] == "Unscanned, reason=error"


# -- spamd ----------------------------------------------------------------------------


def test_spamd_that_stops_reading_times_out_within_its_timeout(stalled_port):
    """A spamd that accepts but never reads: an error after about `timeout` seconds."""
    client = SpamdClient(port=stalled_port, timeout=0.5)
    started = time.monotonic()
    result = asyncio.run(_bounded(client.check(b"A" * (48 * 1024 * 1024)), 5))
    assert result != "hang", "the check did not end within 10x its timeout"
    assert result.status == "error" and "timed out" in result.reason
    assert time.monotonic() - started < 3


def fake_spamd(reply: bytes) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
            writer.write(reply)
            await writer.drain()
        finally:
            writer.close()

    return handle


def _check_reply(reply: bytes) -> SpamResult:
    return asyncio.run(
        _serve(fake_spamd(reply), lambda port: SpamdClient(port=port, timeout=5).check(b"hi"))
    )


def test_a_content_length_of_thousands_of_digits_is_an_error_not_an_exception():
    """An absurd Content-length is a spamd error (message unscanned), never an exception
    escaping to the worker."""
    reply = (b"SPAMD/1.1 0 EX_OK\r\nContent-length: " + b"9" * 5000
             + b"\r\nSpam: True ; 5.0 / 5.0\r\n\r\nGTUBE")
    result = _check_reply(reply)
    assert result.status == "error"


@pytest.mark.parametrize(
    ("spam", "score", "required"),
    [
        (b"True ; 5.0 / 5.0", 5.0, 5.0),
        (b"False ; -3.5 / 5.0", -3.5, 5.0),
        (b"No ; -0.0 / 5.0", 0.0, 5.0),
    ],
)
def test_spam_header_scores_including_negative_ones(spam, score, required):
    """`Spam: <flag> ; <score> / <required>` is read with its sign."""
    result = _check_reply(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 5\r\nSpam: " + spam
                          + b"\r\n\r\nA,B_C")
    assert (result.status, result.score, result.required) == ("scanned", score, required)
    assert result.tests == ("A", "B_C")


# -- DNS ------------------------------------------------------------------------------

RECORDS = [
    # A resolver or wildcard that answers everything with a public address.
    "address=/wild.test/192.0.2.99",
    "address=/2.2.0.192.bl.test/127.0.0.2",
]


@pytest.fixture(scope="module")
def dns_server():
    if shutil.which(DNSMASQ) is None:
        pytest.skip("dnsmasq is not installed (dnsmasq-base)")
    servers = DnsServers.start(RECORDS)
    yield servers
    servers.stop()


def _dns(server, profile_text: str, client_ip: str):
    checker = DnsChecker(nameservers=[f"127.0.0.1:{server.port}"], timeout=1.0, lifetime=2.0)

    async def go():
        lookups = checker.start(parse_profile(profile_text, name="test"),
                                client_ip=client_ip, sender="")
        return await lookups.findings(), lookups.errors

    return asyncio.run(go())


def test_a_named_answer_outside_127_8_is_never_a_listing(dns_server):
    """A list line naming an answer outside 127.0.0.0/8 does not hit when a wildcard
    answers with that address: such answers are errors, never listings."""
    findings, errors = _dns(dns_server, "dnsbl=3,wild.test/192.0.2.99", "192.0.2.1")
    assert findings == []
    assert [e.reason for e in errors] == ["answer outside 127.0.0.0/8 (192.0.2.99)"]


def test_a_named_loopback_answer_still_hits(dns_server):
    """A named answer inside 127.0.0.0/8 hits as before."""
    findings, errors = _dns(dns_server, "dnsbl=3,bl.test/127.0.0.2", "192.0.2.2")
    assert [(f.name, f.score) for f in findings] == [("dnsbl", 3.0)] and errors == []
