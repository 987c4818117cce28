"""Front mode (FILTER_MODE=front, as MessageWall): the worker faces other MTAs itself.

Only our recipients are accepted (relay map file or relay domains), no address trick
turns it into an open relay, relay clients may send anywhere under the relay profile,
the greeting is configurable, and STARTTLS works with a configured certificate.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import time

import pytest

from mailfilter.config import ConfigError, FilterConfig
from mailfilter.server import FilterServer

from .conftest import MemorySink, RecordingPolicy

MESSAGE = b"From: a@remote.example\r\nSubject: front\r\n\r\nbody\r\n"


@pytest.fixture
def relay_map(tmp_path):
    path = tmp_path / "relay_recipients"
    path.write_text("# written by writerelaymap\nalice@ourdomain.test OK\n@wild.test OK\n")
    return path


def _rcpt_codes(port: int, sender: str, recipients: list[str]) -> list[int]:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("mx.remote.example")
        assert client.mail(sender)[0] == 250
        return [client.rcpt(r)[0] for r in recipients]


def test_only_our_recipients_are_accepted_whatever_the_address_trick(start_filter, relay_map):
    """Case 31: the relay test matrix, with an empty sender too."""
    worker = start_filter(mode="front", relay_map_path=str(relay_map),
                          relay_domains=("open.test",))
    tricks = [
        "user@evil.test",
        "user%evil.test@ourdomain.test",
        "user%evil.test@open.test",
        "@ourdomain.test:user@evil.test",
        '"user@evil.test"@ourdomain.test',
        '"user@evil.test"@open.test',
        "user@evil.test@ourdomain.test",
        "evil.test!user@open.test",
        "bob@ourdomain.test",
        "alice@ourdomain.test.evil.test",
    ]
    ours = ["alice@ourdomain.test", "ALICE@OurDomain.test", "anyone@wild.test",
            "anyone@open.test"]
    for sender in ("", "sender@remote.example"):
        codes = _rcpt_codes(worker.port, sender, tricks + ours)
        refused = dict(zip(tricks, codes[: len(tricks)], strict=True))
        assert all(code >= 500 for code in refused.values()), refused
        assert codes[len(tricks):] == [250] * len(ours)


def test_relay_map_is_read_again_when_it_changes(start_filter, relay_map):
    worker = start_filter(mode="front", relay_map_path=str(relay_map))
    assert _rcpt_codes(worker.port, "a@remote.example", ["new@ourdomain.test"]) == [554]
    replacement = relay_map.with_name("relay_recipients.tmp")
    replacement.write_text("alice@ourdomain.test OK\nnew@ourdomain.test OK\n")
    os.replace(replacement, relay_map)
    assert _rcpt_codes(worker.port, "a@remote.example",
                       ["new@ourdomain.test", "alice@ourdomain.test"]) == [250, 250]
    # A map that disappears keeps the last one read (a sync in progress refuses nobody).
    relay_map.unlink()
    assert _rcpt_codes(worker.port, "a@remote.example", ["new@ourdomain.test"]) == [250]


def test_relay_ips_may_send_anywhere_under_the_relay_profile(start_filter, next_hop, relay_map):
    policy = RecordingPolicy()
    worker = start_filter(mode="front", relay_map_path=str(relay_map),
                          relay_ips=("127.0.0.0/8",), policy=policy)
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.sendmail("user@ourdomain.test", ["someone@elsewhere.example"], MESSAGE)
    assert policy.seen == [(True, "relay")]
    assert next_hop.deliveries[0].recipients == ["someone@elsewhere.example"]

    outsider = start_filter(mode="front", relay_map_path=str(relay_map),
                            relay_ips=("192.0.2.0/24",), policy=policy)
    assert _rcpt_codes(outsider.port, "a@remote.example", ["someone@elsewhere.example"]) \
        == [554]


def test_front_mode_without_any_recipient_list_refuses_to_start():
    with pytest.raises(ConfigError, match="open relay"):
        FilterServer(FilterConfig(mode="front"), sink=MemorySink())


def test_banner_is_configurable(start_filter, relay_map, raw):
    worker = start_filter(mode="front", relay_map_path=str(relay_map),
                          banner="ESMTP mail gateway ready")
    assert raw(worker.port).reply() == b"220 filter.test ESMTP mail gateway ready\r\n"
    with pytest.raises(ConfigError):
        FilterConfig(banner="two\r\nlines")


def test_xforward_from_an_untrusted_peer_is_refused_in_front_mode(start_filter, relay_map, raw):
    """Case 32."""
    worker = start_filter(mode="front", relay_map_path=str(relay_map),
                          xforward_hosts=("192.0.2.1/32",))
    client = raw(worker.port)
    client.reply()
    assert b"XFORWARD" not in client.command(b"EHLO mx.remote.example")
    assert client.command(b"XFORWARD ADDR=10.1.2.3 HELO=trusted.example")[:3] == b"550"


def test_starttls_with_the_configured_certificate(start_filter, relay_map, next_hop,
                                                   certificate):
    cert, key = certificate
    worker = start_filter(mode="front", relay_map_path=str(relay_map),
                          tls_cert=str(cert), tls_key=str(key))
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("mx.remote.example")
        assert client.has_extn("starttls")
        client.starttls(context=context)
        assert client.sock.getpeercert()["subject"] == ((("commonName", "filter.test"),),)
        client.sendmail("a@remote.example", ["alice@ourdomain.test"], MESSAGE)
    assert len(next_hop.deliveries) == 1
    assert worker.stat("tls_attempts") == 1


def test_commands_pipelined_after_starttls_are_discarded(start_filter, relay_map, raw,
                                                         certificate):
    """Case 16 (CVE-2011-0411 class): plaintext sent behind STARTTLS never runs."""
    cert, key = certificate
    worker = start_filter(mode="front", relay_map_path=str(relay_map),
                          tls_cert=str(cert), tls_key=str(key))
    client = raw(worker.port)
    client.reply()
    client.command(b"EHLO mx.remote.example")
    client.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@remote.example>\r\n")
    assert client.reply()[:3] == b"220"
    time.sleep(0.2)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    tls = context.wrap_socket(client.sock, server_hostname="filter.test")
    client.sock = tls
    assert client.buffer == b""
    assert client.command(b"EHLO mx.remote.example")[:3] == b"250"
    # Had the injected MAIL run, this RCPT would be accepted.
    assert client.command(b"RCPT TO:<alice@ourdomain.test>")[:3] == b"503"
    assert client.command(b"NOOP")[:3] == b"250"
