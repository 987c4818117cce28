"""Edges of front mode (FILTER_MODE=front) and of the worker's configuration.

Each test states the expected behaviour in its docstring, with its reference
(docs/configuration.md, the specs in shared/spec, or the requirement it checks). They run
the real worker on loopback (tests/mailfilter/conftest.py) or the real `manage.py
runfilter` where start-up matters.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess

import pytest

from mailfilter.config import ConfigError, FilterConfig
from mailfilter.profiles import ProfileError, read_profile
from mailfilter.server import FilterServer, ServerThread, listening_sockets
from tests.mailfilter.processes import start_runfilter, stop_process

from .conftest import MemorySink, RecordingPolicy

MESSAGE = b"From: a@remote.example\r\nSubject: edges\r\n\r\nbody\r\n"


def _stop(process: subprocess.Popen) -> tuple[str, str]:
    """Stop the process if it still runs; its (stdout, stderr)."""
    stop_process(process)
    out = process.stdout.read()
    err = process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    return out, err


def _outputs_once_exited(process: subprocess.Popen, timeout: float = 30) -> tuple[str, str]:
    """(stdout, stderr) of a process that must exit by itself; one still running after
    `timeout` seconds is stopped and fails the test."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, _ = _stop(process)
        pytest.fail(f"still running after {timeout} s: {out!r}")


def _port_of(line: str) -> int:
    return int(line.split(",")[0].rsplit(":", 1)[1])


# -- front mode: no open relay ------------------------------------------------------------


def test_runfilter_in_front_mode_without_relay_map_or_domains_refuses_to_start(
    tmp_path, next_hop
):
    """docs/configuration.md, FILTER_RELAY_DOMAINS: "Front mode refuses to start without a
    map or domains" (and FilterServer's own check says why: without them no recipient
    would be refused, an open relay). `manage.py runfilter` with FILTER_MODE=front and
    neither FILTER_RELAY_MAP nor FILTER_RELAY_DOMAINS must exit non-zero naming them,
    never listen and accept mail for any domain."""
    process = start_runfilter({
        "FILTER_MODE": "front",
        "FILTER_NEXT_HOP": f"127.0.0.1:{next_hop.port}",
        "QUARANTINE_DIR": str(tmp_path / "q"),
        "FILTER_PID_FILE": str(tmp_path / "filter.pid"),
    })
    try:
        # The first line is "filter listening on ..." once it listens; EOF if it stopped.
        line = process.stdout.readline()
        if "filter listening on" in line:
            # It started: show what it does with a recipient of somebody else's domain.
            port = _port_of(line)
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("mx.remote.example")
                client.mail("spammer@remote.example")
                code, text = client.rcpt("victim@elsewhere.example")
            pytest.fail(
                "front mode started without FILTER_RELAY_MAP/FILTER_RELAY_DOMAINS and "
                f"answered RCPT TO:<victim@elsewhere.example> with {code} {text!r} "
                "(an open relay)"
            )
        returncode = process.wait(30)
    finally:
        _, err = _stop(process)
    assert returncode != 0
    assert "FILTER_RELAY_MAP" in err and "FILTER_RELAY_DOMAINS" in err, err


def test_relay_ips_relay_from_ipv4_clients_on_a_dual_stack_listener(next_hop):
    """FILTER_RELAY_IPS (docs/configuration.md): "Front mode: they may send to any
    address". runfilter binds FILTER_LISTEN=[::]:25 with `listening_sockets`, an AF_INET6
    socket that also takes IPv4 connections (their peers are ::ffff:a.b.c.d). A client of
    127.0.0.0/8 connecting over IPv4 to that listener is in FILTER_RELAY_IPS and may
    relay to another domain (250), as it may on an IPv4 listener."""
    config = FilterConfig(
        listen_host="::", listen_port=0, next_hop_host="127.0.0.1",
        next_hop_port=next_hop.port, hostname="filter.test", mode="front",
        relay_domains=("ourdomain.test",), relay_ips=("127.0.0.0/8",),
        relay_connect_timeout=5, relay_command_timeout=5, relay_data_timeout=5,
    )
    try:
        [sock] = listening_sockets(config)
    except OSError as exc:  # pragma: no cover - no IPv6 on this host
        pytest.skip(f"no IPv6 listener: {exc}")
    if sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):  # pragma: no cover
        sock.close()
        pytest.skip("IPv6 sockets are v6-only on this host")
    port = sock.getsockname()[1]
    thread = ServerThread(lambda: FilterServer(config, sink=MemorySink(), sock=sock))
    thread.start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.ourdomain.test")
            assert client.mail("user@ourdomain.test")[0] == 250
            ours = client.rcpt("someone@ourdomain.test")[0]
            elsewhere = client.rcpt("someone@elsewhere.example")
    finally:
        thread.stop()
    assert ours == 250
    assert elsewhere[0] == 250, elsewhere


def test_relay_ips_behind_postfix_match_an_ipv6_client_named_in_xforward(start_filter, raw):
    """FILTER_RELAY_IPS behind Postfix: "the client Postfix names in XFORWARD" gets the
    relay profile (docs/configuration.md, Profiles). Postfix names an IPv6 client as
    `ADDR=IPV6:<addr>` (shared/spec/postfix-filter.md 4.3, the XFORWARD attribute table),
    so an XFORWARD ADDR=IPV6:2001:db8::5 from the trusted Postfix, with 2001:db8::/32 in
    FILTER_RELAY_IPS, makes the message a relay client's (relay profile)."""
    policy = RecordingPolicy()
    worker = start_filter(policy=policy, relay_ips=("2001:db8::/32", "192.0.2.0/24"))
    for address in ("192.0.2.5", "IPV6:2001:db8::5"):
        client = raw(worker.port)
        assert client.reply()[:3] == b"220"
        assert client.command(b"EHLO postfix.ourdomain.test")[:3] == b"250"
        assert client.command(
            f"XFORWARD NAME=client.ourdomain.test ADDR={address} PROTO=ESMTP".encode()
        )[:3] == b"250"
        assert client.command(b"MAIL FROM:<user@ourdomain.test>")[:3] == b"250"
        assert client.command(b"RCPT TO:<someone@elsewhere.example>")[:3] == b"250"
        assert client.command(b"DATA")[:3] == b"354"
        assert client.command(MESSAGE + b".")[:3] == b"250"
        assert client.command(b"QUIT")[:3] == b"221"
    assert policy.seen[0] == (True, "relay")  # the IPv4 client: recognised
    assert policy.seen[1] == (True, "relay"), policy.seen  # the IPv6 one, as Postfix names it


# -- the metrics endpoint ------------------------------------------------------------------


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_missing_tls_certificate_stops_the_start_naming_the_setting(tmp_path, processes):
    """Requirement: a missing certificate gives a clear error naming the setting and the
    process refuses to start (docs/configuration.md: "a value that cannot be read stops
    the start with an error naming the variable"). With FILTER_TLS_CERT/FILTER_TLS_KEY
    naming files that do not exist, `runfilter` exits non-zero, its error output names
    FILTER_TLS_CERT, and it never announces "filter listening", with one worker process
    or several (FILTER_PROCESSES)."""
    process = start_runfilter({
        "FILTER_PROCESSES": processes,
        "FILTER_TLS_CERT": str(tmp_path / "missing-cert.pem"),
        "FILTER_TLS_KEY": str(tmp_path / "missing-key.pem"),
        "QUARANTINE_DIR": str(tmp_path / "q"),
        "FILTER_PID_FILE": str(tmp_path / "filter.pid"),
    })
    out, err = _outputs_once_exited(process)
    assert process.returncode != 0
    assert "FILTER_TLS_CERT" in err, err[-1500:]
    assert "filter listening" not in out


# -- configuration values ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CLAMD_PORT", "SPAMD_PORT"])
def test_a_scanner_port_above_65535_stops_the_start_naming_the_variable(name):
    """docs/configuration.md: "a value that cannot be read stops the start with an error
    naming the variable". A TCP port is 1-65535 (FILTER_LISTEN and FILTER_NEXT_HOP are
    checked so); CLAMD_PORT=70000 or SPAMD_PORT=70000 must raise ConfigError naming the
    variable, not start a worker whose every scan fails."""
    with pytest.raises(ConfigError, match=name):
        FilterConfig.from_env({"CLAMD_HOST": "127.0.0.1", "SPAMD_HOST": "127.0.0.1",
                               name: "70000"})


@pytest.mark.parametrize("name", ["FILTER_LISTEN", "FILTER_NEXT_HOP", "FILTER_METRICS_LISTEN"])
def test_a_port_written_with_a_non_ascii_digit_is_a_config_error(name):
    """A port that is not an ASCII number (`127.0.0.1:²`, a superscript two that
    str.isdigit() accepts and int() does not) is a value that cannot be read: ConfigError
    naming the variable (which runfilter turns into a one-line CommandError), not a bare
    ValueError with a traceback that names no variable."""
    with pytest.raises(ConfigError, match=name):
        FilterConfig.from_env({name: "127.0.0.1:\u00b2"})


def test_relay_ips_with_host_bits_set_is_refused_not_widened():
    """"Bad CIDR ... gives a clear error naming the setting". FILTER_RELAY_IPS lists the
    networks that may relay to any address; `192.0.2.77/16` has host bits set (Postfix
    refuses such a mynetworks entry: "non-null host address bits ... perhaps you should
    use 192.0.0.0/16"). It must not silently become 192.0.0.0/16, letting 65,536
    addresses relay; ConfigError naming FILTER_RELAY_IPS."""
    try:
        config = FilterConfig.from_env({"FILTER_RELAY_IPS": "192.0.2.77/16"})
    except ConfigError as exc:
        assert "FILTER_RELAY_IPS" in str(exc)
        return
    assert not config.relay_allowed("192.0.200.1"), (
        "192.0.2.77/16 was read as 192.0.0.0/16: 192.0.200.1 may relay anywhere"
    )


def test_an_unknown_filter_variable_stops_the_start():
    """Requirement: an unknown setting gives a clear error naming it and the worker
    refuses to start (config.py: "a typo stops the start with a clear message instead of
    silently falling back to a default"). FILTER_MAX_CLIENT=5 (for FILTER_MAX_CLIENTS)
    must not start a worker that takes 100 clients."""
    with pytest.raises(ConfigError, match="FILTER_MAX_CLIENT"):
        FilterConfig.from_env({"FILTER_MAX_CLIENT": "5"})


def test_a_profile_size_with_a_non_ascii_digit_is_refused_with_file_and_line(tmp_path):
    """docs/configuration.md, Profiles: "A file with an unknown variable, a bad score or
    value ... is refused with its path and line". `spam_max_size=²` (str.isdigit() is true
    for a superscript two, int() refuses it) must be a ProfileError naming the file and
    line 2, not a bare ValueError (which runfilter reports without file or line, and a
    reload logs the same way)."""
    path = tmp_path / "Medium"
    path.write_text("reject_score=5\nspam_max_size=\u00b2\n", encoding="utf-8")
    with pytest.raises(ProfileError, match=rf"{path}:2: spam_max_size"):
        read_profile(path)


# -- start-up as root ----------------------------------------------------------------------


def test_a_hostname_of_several_lines_is_refused_like_the_banner():
    """FILTER_BANNER "must be one line" (config.py refuses CR, LF, NUL in it), because it
    goes into the 220 greeting. FILTER_HOSTNAME goes into the same greeting line, the
    Received field of every relayed message and the EHLO to the next hop, so a value with
    a line break (`mx.ourdomain.test\\nX-Injected: 1`) must be refused the same way
    (ConfigError naming FILTER_HOSTNAME), not written into those lines."""
    with pytest.raises(ConfigError, match="FILTER_HOSTNAME"):
        FilterConfig.from_env({"FILTER_HOSTNAME": "mx.ourdomain.test\nX-Injected: 1"})
