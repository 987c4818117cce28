"""`manage.py postfixconfig`: the main.cf and master.cf lines for each mode, read back as
Postfix would read them, and loaded into a throw-away Postfix configuration."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from django.core.management import call_command

from mailfilter.config import FilterConfig, postfix_snippet
from tests.e2e.postfix import requires_postfix

FILTER_VARIABLES = re.compile(r"^(FILTER_|RELAY_DOMAINS$|RELAY_NEXT_HOP$)")


@pytest.fixture
def environment(monkeypatch, settings, tmp_path):
    """Only the settings the test names: no FILTER_* or RELAY_* from the caller's shell."""
    for name in list(os.environ):
        if FILTER_VARIABLES.match(name):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RELAY_DOMAINS", "example.com, Example.org")
    monkeypatch.setenv("RELAY_NEXT_HOP", "mail.example.com")
    settings.RELAY_MAP_PATH = tmp_path / "relay_recipients"
    settings.RELAY_MAP_POSTMAP = "hash"
    return monkeypatch


def postfixconfig(*args: str) -> str:
    out = io.StringIO()
    call_command("postfixconfig", *args, stdout=out)
    return out.getvalue()


def parse(text: str) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """main.cf `name = value` lines, and master.cf services: {service line: {-o overrides}}."""
    main: dict[str, str] = {}
    master: dict[str, dict[str, str]] = {}
    section = None
    service = None
    for line in text.splitlines():
        if line in ("# main.cf", "# master.cf"):
            section = line[2:]
            continue
        if not line.strip() or line.startswith("#"):
            continue
        if section == "main.cf":
            name, sep, value = line.partition(" = ")
            assert sep, line
            main[name] = value
        elif section == "master.cf":
            if line.startswith((" ", "\t")):
                option, _, setting = line.strip().partition(" ")
                assert option == "-o", line
                name, _, value = setting.partition("=")
                master[service][name] = value
            else:
                service = line
                master[service] = {}
        else:
            raise AssertionError(f"a line outside both files: {line!r}")
    return main, master


def seconds(value: str) -> int:
    assert value.endswith("s"), value
    return int(value[:-1])


def test_content_filter_mode(environment, settings):
    main, master = parse(postfixconfig("--mode", "content_filter"))
    config = FilterConfig.from_env({})

    assert main["content_filter"] == "spamviewer:[127.0.0.1]:10024"
    assert main["relay_recipient_maps"] == f"hash:{settings.RELAY_MAP_PATH}"
    assert main["relay_domains"] == "example.com, Example.org"
    assert main["relay_transport"] == "relay:[mail.example.com]"
    assert main["smtpd_forbid_bare_newline"] == "normalize"
    transport = master["spamviewer unix - - n - 100 smtp"]
    assert transport["smtp_send_xforward_command"] == "yes"
    # Postfix waits longer than the worker may take, so it never gives up on a message
    # the worker then delivers.
    assert seconds(transport["smtp_data_done_timeout"]) > (
        config.check_timeout + config.relay_data_timeout)
    assert seconds(transport["smtp_rcpt_timeout"]) > (
        config.relay_connect_timeout + config.relay_command_timeout)
    reinjection = master["127.0.0.1:10025 inet n - n - - smtpd"]
    assert reinjection["content_filter"] == ""
    assert reinjection["mynetworks"] == "127.0.0.0/8"
    assert reinjection["smtpd_recipient_restrictions"] == "permit_mynetworks,reject"
    assert reinjection["relay_recipient_maps"] == ""
    assert "no_header_body_checks" in reinjection["receive_override_options"]


def test_proxy_filter_mode(environment):
    environment.setenv("FILTER_RELAY_DATA_TIMEOUT", "900")
    main, master = parse(postfixconfig("--mode", "proxy_filter"))

    assert "content_filter" not in main
    assert main["relay_recipient_maps"].startswith("hash:")
    inbound = master["smtp inet n - y - - smtpd"]
    assert inbound["smtpd_proxy_filter"] == "127.0.0.1:10024"
    assert seconds(inbound["smtpd_proxy_timeout"]) > 900 + FilterConfig().check_timeout
    assert inbound["smtpd_forbid_bare_newline"] == "normalize"
    assert "127.0.0.1:10025 inet n - n - - smtpd" in master


def test_the_mode_defaults_to_filter_mode(environment):
    environment.setenv("FILTER_MODE", "proxy_filter")
    assert "# Postfix settings for spamviewer, proxy_filter mode." in postfixconfig()


def test_front_mode_leaves_recipients_to_the_worker(environment):
    main, master = parse(postfixconfig("--mode", "front"))
    assert "relay_recipient_maps" not in main
    assert main["relay_transport"] == "relay:[mail.example.com]"
    assert list(master) == ["127.0.0.1:10025 inet n - n - - smtpd"]

    environment.setenv("FILTER_NEXT_HOP", "192.0.2.25:25")
    text = postfixconfig("--mode", "front")
    assert "no Postfix on this host is needed" in text
    assert "main.cf" not in text


def test_relay_map_without_postmap_is_read_as_text(environment, settings):
    settings.RELAY_MAP_POSTMAP = "none"
    main, _ = parse(postfixconfig("--mode", "content_filter"))
    assert main["relay_recipient_maps"] == f"texthash:{settings.RELAY_MAP_PATH}"


def test_the_printed_lines_are_the_snippet_the_end_to_end_tests_use(environment, settings):
    text = postfixconfig("--mode", "content_filter")
    snippet = postfix_snippet(
        FilterConfig.from_env(), relay_domains=("example.com", "Example.org"),
        relay_next_hop="mail.example.com", relay_map=f"hash:{settings.RELAY_MAP_PATH}",
    )
    assert text.endswith(snippet.text())


def test_a_bad_filter_setting_is_named(environment):
    from django.core.management.base import CommandError

    environment.setenv("FILTER_LISTEN", "nowhere")
    with pytest.raises(CommandError, match="FILTER_LISTEN"):
        postfixconfig()


@pytest.mark.parametrize("listen", ["0.0.0.0:10024", "[::]:10024"])
@pytest.mark.parametrize("mode", ["content_filter", "proxy_filter"])
def test_a_wildcard_listen_address_is_refused_naming_what_postfix_needs(
    environment, listen, mode
):
    """Postfix cannot connect to 0.0.0.0, and its reinjection smtpd would trust only
    0.0.0.0/32: every passed message would be refused there and bounce."""
    from django.core.management.base import CommandError

    environment.setenv("FILTER_LISTEN", listen)
    environment.setenv("FILTER_NEXT_HOP", "10.0.0.5:10025")
    with pytest.raises(CommandError, match="not a wildcard; set FILTER_LISTEN to that address"):
        postfixconfig("--mode", mode)


def test_front_mode_may_listen_on_every_address(environment):
    environment.setenv("FILTER_LISTEN", "0.0.0.0:25")
    assert "front mode" in postfixconfig("--mode", "front")


@pytest.fixture
def postfix_dir():
    """A Postfix configuration directory of its own (world-traversable: Postfix's own
    programs run as the postfix user) with the distribution's master.cf."""
    base = Path(tempfile.mkdtemp(prefix="sv-postfixconfig-"))
    os.chmod(base, 0o755)
    conf, spool, data = base / "etc", base / "spool", base / "data"
    for directory in (conf, spool, data):
        directory.mkdir()
    shutil.chown(data, "postfix")
    shutil.copy("/etc/postfix/master.cf", conf / "master.cf")
    # maillog_file=/dev/stdout: the commands log straight to their output, with neither
    # syslog nor postlogd running.
    (conf / "main.cf").write_text(
        f"compatibility_level = 3.6\nqueue_directory = {spool}\ndata_directory = {data}\n"
        "myhostname = postfix.test\nmydestination =\ninet_interfaces = 127.0.0.1\n"
        "inet_protocols = ipv4\nmynetworks = 127.0.0.0/8\nalias_maps =\nalias_database =\n"
        "maillog_file = /dev/stdout\n"
    )
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _marked(marks):
    def apply(test):
        for mark in marks:
            test = mark(test)
        return test
    return apply


@_marked(requires_postfix)
@pytest.mark.parametrize("mode", ["content_filter", "proxy_filter"])
def test_the_printed_config_loads_into_postfix(environment, settings, postfix_dir, mode):
    settings.RELAY_MAP_PATH = postfix_dir / "relay_recipients"
    settings.RELAY_MAP_PATH.write_text("alice@example.com OK\n")
    subprocess.run(["postmap", f"hash:{settings.RELAY_MAP_PATH}"], check=True)
    text = postfixconfig("--mode", mode)
    main_lines, master_lines = text.split("# master.cf\n")
    conf = postfix_dir / "etc"
    if mode == "proxy_filter":
        # The printed smtp/inet line replaces the distribution's, as the reader would.
        subprocess.run(["postconf", "-c", str(conf), "-M#", "smtp/inet"], check=True)
    with open(conf / "main.cf", "a") as main_cf:
        main_cf.write(main_lines.split("# main.cf\n")[1])
    with open(conf / "master.cf", "a") as master_cf:
        master_cf.write(master_lines)

    shown = subprocess.run(["postconf", "-c", str(conf), "-n"], capture_output=True,
                           text=True, check=True)
    assert "warning" not in shown.stderr, shown.stderr
    main, master = parse(text)
    for name, value in main.items():
        assert f"{name} = {value}\n" in shown.stdout
    overrides = subprocess.run(["postconf", "-c", str(conf), "-P"], capture_output=True,
                               text=True, check=True)
    assert "warning" not in overrides.stderr, overrides.stderr
    for service, options in master.items():
        name, kind = service.split()[:2]
        for option, value in options.items():
            assert f"{name}/{kind}/{option} = {value}".rstrip() in overrides.stdout
    checked = subprocess.run(["postfix", "-c", str(conf), "check"], capture_output=True,
                             text=True, env={**os.environ, "MAIL_CONFIG": str(conf)})
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "warning" not in checked.stdout + checked.stderr
    assert subprocess.run(["postmap", "-q", "alice@example.com", main["relay_recipient_maps"]],
                          capture_output=True).returncode == 0
