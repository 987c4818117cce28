"""Protocol limits: sizes, line and header counts, recipients, timeouts, connection and
command floods (security cases 19-21, 23, 25, 27-29)."""

from __future__ import annotations

import smtplib
import time
import tracemalloc

from .conftest import RawClient


def data_phase(raw, port, **kwargs) -> RawClient:
    client = raw(port, **kwargs)
    assert client.reply()[:3] == b"220"
    client.command(b"EHLO client.test")
    assert client.command(b"MAIL FROM:<a@remote.example>")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"
    return client


def test_overlong_command_line_gets_500_and_the_session_goes_on(start_filter, raw):
    worker = start_filter()
    client = raw(worker.port)
    client.reply()
    assert client.command(b"EHLO " + b"x" * 10_000).startswith(b"500")
    assert client.command(b"EHLO client.test")[:3] == b"250"
    assert client.command(b"NOOP")[:3] == b"250"


def test_one_megabyte_line_is_refused_after_the_data_and_nothing_is_relayed(
    start_filter, next_hop, raw
):
    worker = start_filter()
    client = data_phase(raw, worker.port)
    client.send(b"Subject: long\r\n\r\n" + b"y" * 1_000_000 + b"\r\n.\r\n")
    assert client.reply().startswith(b"500 5.5.2 Line too long")
    assert client.command(b"NOOP")[:3] == b"250"
    assert next_hop.deliveries == []


def test_line_at_the_limit_passes(start_filter, next_hop, raw):
    worker = start_filter(max_line_length=998)
    client = data_phase(raw, worker.port)
    client.send(b"Subject: edge\r\n\r\n" + b"." + b"z" * 998 + b"\r\n.\r\n")
    assert client.reply()[:3] == b"250"
    assert next_hop.deliveries[0].content.endswith(b"\r\n" + b"z" * 998 + b"\r\n")


def test_oversized_message_is_read_to_the_end_and_refused_without_being_kept_in_memory(
    start_filter, next_hop, raw
):
    limit = 1024 * 1024
    worker = start_filter(max_message_size=limit)
    client = data_phase(raw, worker.port)
    line = b"x" * 990 + b"\r\n"
    chunk = line * 64
    tracemalloc.start()
    try:
        client.send(b"Subject: big\r\n\r\n")
        for _ in range(16 * limit // len(chunk)):
            client.send(chunk)
        client.send(b".\r\n")
        reply = client.reply()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.startswith(b"552 5.3.4")
    # About 16 MiB went through; the worker held little more than the 1 MiB it may keep.
    assert peak < 3 * limit, peak
    assert client.command(b"NOOP")[:3] == b"250"
    assert next_hop.deliveries == []
    assert worker.stat("bytes_received") > 15 * limit


def test_declared_size_above_the_limit_is_refused_at_mail(start_filter):
    worker = start_filter(max_message_size=100_000)
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        assert client.mail("a@remote.example", ["SIZE=200000"])[0] == 552


def test_too_many_header_fields_are_refused(start_filter, next_hop, raw):
    worker = start_filter(max_header_count=100)
    client = data_phase(raw, worker.port)
    client.send(b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\nbody\r\n.\r\n")
    assert client.reply().startswith(b"552 5.6.0 Too many header fields")
    assert next_hop.deliveries == []


def test_folded_lines_do_not_count_as_header_fields(start_filter, next_hop, raw):
    worker = start_filter(max_header_count=3)
    client = data_phase(raw, worker.port)
    client.send(b"To: a@x,\r\n b@x,\r\n\tc@x\r\nSubject: s\r\nFrom: f@x\r\n\r\nbody\r\n.\r\n")
    assert client.reply()[:3] == b"250"


def test_recipient_after_the_thousandth_gets_452_and_the_thousand_are_delivered(
    start_filter, next_hop
):
    worker = start_filter()
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        client.ehlo("client.test")
        client.mail("a@remote.example")
        codes = [client.rcpt(f"user{i}@example.test")[0] for i in range(1001)]
        assert client.data(b"Subject: many\r\n\r\nbody\r\n")[0] == 250
    assert codes[:1000] == [250] * 1000
    assert codes[1000] == 452
    assert len(next_hop.deliveries[0].recipients) == 1000


def test_client_silent_between_commands_is_sent_421_and_disconnected(start_filter, raw):
    worker = start_filter(command_timeout=0.3)
    client = raw(worker.port)
    client.reply()
    client.send(b"EH")
    started = time.monotonic()
    assert client.reply().startswith(b"421 4.4.2")
    assert client.closed()
    assert time.monotonic() - started < 3
    assert worker.thread.call(lambda: worker.server.gate.total) == 0


def test_client_stalling_inside_data_is_sent_421_and_nothing_is_relayed(
    start_filter, next_hop, raw
):
    worker = start_filter(data_timeout=0.3)
    client = data_phase(raw, worker.port)
    client.send(b"Subject: stall\r\n\r\nhalf a mess")
    assert client.reply().startswith(b"421 4.4.2")
    assert client.closed()
    assert next_hop.deliveries == []


def test_client_trickling_data_below_the_minimum_rate_is_cut_off(start_filter, next_hop, raw):
    worker = start_filter(data_timeout=0.5, min_data_rate=1000)
    client = data_phase(raw, worker.port)
    started = time.monotonic()
    reply = b""
    client.sock.settimeout(0.15)
    while time.monotonic() - started < 5:
        try:
            client.send(b"X-Slow: 1\r\n")
        except (BrokenPipeError, ConnectionResetError):
            break
        try:
            reply = client.sock.recv(1000)
        except TimeoutError:
            continue
        break
    assert reply.startswith(b"421 4.4.2 Error: data too slow")
    assert time.monotonic() - started < 3
    assert next_hop.deliveries == []


def test_connections_beyond_the_per_address_limit_get_421_and_the_others_go_on(
    start_filter, raw
):
    worker = start_filter(max_per_ip=5)
    clients = [raw(worker.port) for _ in range(8)]
    greetings = [c.reply()[:3] for c in clients]
    assert greetings == [b"220"] * 5 + [b"421"] * 3
    assert all(c.closed() for c in clients[5:])
    assert all(c.command(b"NOOP")[:3] == b"250" for c in clients[:5])
    assert worker.stat("connections_refused", "per_ip") == 3
    clients[0].command(b"QUIT")
    clients[0].closed()
    late = raw(worker.port)
    assert late.reply()[:3] == b"220"


def test_connections_beyond_the_total_limit_get_421(start_filter, raw):
    worker = start_filter(max_clients=3, max_per_ip=0)
    clients = [raw(worker.port) for _ in range(5)]
    assert [c.reply()[:3] for c in clients] == [b"220"] * 3 + [b"421"] * 2
    assert worker.stat("connections_refused", "total") == 2


def test_command_flood_is_cut_off_at_the_command_limit(start_filter, raw):
    worker = start_filter(max_commands=50)
    client = raw(worker.port)
    client.reply()
    client.send(b"NOOP\r\n" * 100 + b"\r\n" * 100)
    replies = []
    while True:
        try:
            replies.append(client.reply()[:3])
        except (TimeoutError, ConnectionError):
            break
    assert replies == [b"250"] * 50 + [b"421"]
    assert worker.stat("protocol_errors", "too_many_commands") == 1


def test_command_budget_starts_again_after_each_accepted_message(start_filter, next_hop):
    worker = start_filter(max_commands=10)
    with smtplib.SMTP("127.0.0.1", worker.port) as client:
        for _ in range(4):
            client.sendmail("a@remote.example", ["alice@example.test"], b"Subject: s\r\n\r\nb\r\n")
    assert len(next_hop.deliveries) == 4
