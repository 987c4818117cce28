"""Profile and special-users files at their edges: every bad file is refused with its path,
line and reason (at start and at a reload, which keeps the profiles in use), and the
profile choice treats the spellings of one address alike."""

from __future__ import annotations

import os
import signal
import smtplib
import time
from pathlib import Path

import pytest

from mailfilter.config import FilterConfig
from mailfilter.policy import FilterChecks
from mailfilter.profiles import (
    ProfileError,
    ProfileSet,
    load_profiles,
    parse_profile,
    read_profile,
)
from tests.mailfilter.processes import start_runfilter, stop_process
from tests.mailfilter.test_policy import message
from tests.mailfilter.test_reload import transaction, worker  # noqa: F401 (fixture)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture
def profile_dir(tmp_path):
    directory = tmp_path / "profiles"
    directory.mkdir()
    for name in ("Medium", "Relay", "Strong"):
        write(directory, name, "reject_score=5\n")
    write(directory, "Reject", "reject=1\n")
    return directory


# --- regular expressions Python refuses with something else than re.error -------------------


@pytest.mark.parametrize(
    "key",
    ["/a{4294967296}/", "/" + "(" * 1200 + ")" * 1200 + "/"],
    ids=["repeat-too-large", "nested-too-deep"],
)
def test_a_regular_expression_python_cannot_compile_is_a_profile_error(tmp_path, key):
    """re.compile raises OverflowError for a repeat count over 2**32 and RecursionError
    for deep nesting; both are a bad value of that line."""
    write(tmp_path, "Bad", f"reject_score=5\nheader_rejecti=1,Subject:{key}\n")
    with pytest.raises(ProfileError) as caught:
        load_profiles(tmp_path)
    assert (caught.value.path, caught.value.line) == (str(tmp_path / "Bad"), 2)
    assert "header_rejecti: bad regular expression" in caught.value.reason


def test_such_an_expression_stops_the_start_with_file_line_and_reason(tmp_path):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    write(profiles, "Relay", "reject_score=10\n")
    write(profiles, "Medium", "reject_score=5\nheader_rejecti=1,Subject:/a{4294967296}/\n")
    process = start_runfilter({"PROFILE_DIR": str(profiles),
                               "FILTER_PID_FILE": str(tmp_path / "filter.pid")})
    try:
        _, err = process.communicate(timeout=60)
    finally:
        process.stdout.close()
        process.stderr.close()
    assert process.returncode != 0
    assert f"{profiles / 'Medium'}:2: header_rejecti: bad regular expression" in err
    assert "Traceback" not in err


def test_a_reload_meeting_such_an_expression_keeps_the_profiles_and_says_where(
    worker, raw  # noqa: F811
):
    client = raw(worker.port, timeout=10)
    assert client.reply()[:3] == b"220"
    assert client.command(b"EHLO client.test")[:3] == b"250"
    (worker.profiles / "Medium").write_text(
        "reject=1\nheader_rejecti=1,Subject:/" + "(" * 1200 + ")" * 1200 + "/\n"
    )
    worker.send_signal(signal.SIGHUP)
    time.sleep(1)
    transaction(client)
    assert client.command(message() + b".")[:3] == b"250"
    assert client.command(b"QUIT")[:3] == b"221"
    stop_process(worker)
    log = worker.stderr.read()
    assert f"{worker.profiles / 'Medium'}:2: header_rejecti: bad regular expression" in log
    assert "reload failed, the profiles in use stay" in log


@pytest.mark.parametrize("name", ["a" * 300, "x/" * 3000], ids=["long-name", "long-path"])
def test_a_signature_file_name_the_system_refuses_is_a_profile_error(tmp_path, name):
    """Looking the file up raised OSError (ENAMETOOLONG here, EACCES for a directory the
    worker's user may not search), which no caller expects of a profile."""
    write(tmp_path, "Bad", f"reject=0\nvirus_scan=1,{name}\n")
    with pytest.raises(ProfileError) as caught:
        load_profiles(tmp_path)
    assert (caught.value.path, caught.value.line) == (str(tmp_path / "Bad"), 2)
    assert caught.value.reason.startswith("virus_scan: signature file")


# --- byte order marks, encodings, odd files ---------------------------------------------------


def test_a_profile_saved_with_a_byte_order_mark_loads(tmp_path):
    (tmp_path / "P").write_bytes(b"\xef\xbb\xbfreject_score=4\nreject=0\n")
    assert read_profile(tmp_path / "P").reject_score == 4


def test_a_byte_order_mark_inside_a_profile_is_still_refused():
    with pytest.raises(ProfileError) as caught:
        parse_profile("reject=0\n\ufeffreject_score=4\n", name="P")
    assert caught.value.line == 2


def test_a_special_users_file_saved_with_a_byte_order_mark_keeps_its_first_line(
    profile_dir, tmp_path
):
    """Windows editors start a UTF-8 file with U+FEFF; it was read as part of the first
    address, whose entry then never matched."""
    users = tmp_path / "special_users"
    users.write_bytes(b"\xef\xbb\xbfceo@example.org Reject\r\nexample.org Strong\r\n")
    profiles = ProfileSet.load(profile_dir, special_users=users)
    assert profiles.choose_profile("ceo@example.org").name == "Reject"
    assert profiles.choose_profile("sales@example.org").name == "Strong"


def test_a_special_users_file_that_is_not_utf8_is_refused_with_its_line(profile_dir, tmp_path):
    users = tmp_path / "special_users"
    users.write_bytes(b"a@example.org Reject\nb@caf\xe9.example Strong\n")
    with pytest.raises(ProfileError) as caught:
        ProfileSet.load(profile_dir, special_users=users)
    assert (caught.value.path, caught.value.line) == (str(users), 2)
    assert "not valid UTF-8" in caught.value.reason


def test_a_special_users_path_that_is_a_fifo_is_refused_without_waiting(profile_dir, tmp_path):
    """Opening a FIFO for reading waits for a writer: the reload (run on the worker's
    event loop) would never end."""
    fifo = tmp_path / "special_users"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(ProfileError) as caught:
        ProfileSet.load(profile_dir, special_users=fifo)
    assert time.monotonic() - started < 5
    assert caught.value.path == str(fifo) and "not a regular file" in caught.value.reason


def test_a_huge_profile_file_is_refused_without_reading_it_all(tmp_path):
    with open(tmp_path / "Huge", "wb") as out:
        out.write(b"reject=0\n")
        out.write((b"# " + b"x" * 1021 + b"\n") * (64 * 1024))
    started = time.monotonic()
    with pytest.raises(ProfileError) as caught:
        load_profiles(tmp_path)
    assert time.monotonic() - started < 1
    assert caught.value.path == str(tmp_path / "Huge")
    assert "larger than" in caught.value.reason


# --- the spellings of one address -------------------------------------------------------------


def test_special_users_domains_match_in_either_idna_form(profile_dir, tmp_path):
    users = write(
        tmp_path, "special_users", "xn--bcher-kva.example Reject\nmüller.example Strong\n"
    )
    profiles = ProfileSet.load(profile_dir, special_users=users)
    assert profiles.choose_profile("ceo@bücher.example").name == "Reject"
    assert profiles.choose_profile("ceo@XN--BCHER-KVA.example").name == "Reject"
    assert profiles.choose_profile("ceo@müller.example").name == "Strong"
    assert profiles.choose_profile("ceo@xn--mller-kva.example").name == "Strong"


def test_special_users_addresses_match_in_either_idna_form(profile_dir, tmp_path):
    users = write(tmp_path, "special_users", "Jürgen@Bücher.example Reject\n")
    profiles = ProfileSet.load(profile_dir, special_users=users)
    assert profiles.choose_profile("jürgen@xn--bcher-kva.example").name == "Reject"
    assert profiles.choose_profile("JÜRGEN@bücher.example").name == "Reject"


def test_a_trailing_dot_in_a_special_users_domain_does_not_hide_it(profile_dir, tmp_path):
    users = write(tmp_path, "special_users", "example.org. Reject\nceo@example.net. Strong\n")
    profiles = ProfileSet.load(profile_dir, special_users=users)
    assert profiles.choose_profile("x@example.org").name == "Reject"
    assert profiles.choose_profile("ceo@example.net").name == "Strong"


def test_a_utf8_recipient_gets_the_profile_of_its_idna_domain_through_the_worker(
    start_filter, next_hop, raw, profile_dir, tmp_path
):
    users = write(tmp_path, "special_users", "xn--bcher-kva.example Reject\n")
    checks = FilterChecks(FilterConfig(profile_dir=str(profile_dir), special_users=str(users)))
    running = start_filter(policy=checks.policy, lookup=checks.lookup)
    client = raw(running.port)
    assert client.reply()[:3] == b"220"
    assert client.command(b"EHLO client.test")[:3] == b"250"
    assert client.command(b"MAIL FROM:<sender@remote.example> SMTPUTF8")[:3] == b"250"
    assert client.command(b"RCPT TO:<alice@example.test>")[:3] == b"250"
    reply = client.command("RCPT TO:<ceo@bücher.example>".encode())
    assert reply.startswith(b"451 4.5.3") and b"send it separately" in reply, reply
    assert client.command(b"QUIT")[:3] == b"221"

    with smtplib.SMTP("127.0.0.1", running.port) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("sender@remote.example")
        assert smtp.rcpt("ceo@xn--bcher-kva.example")[0] == 250
        assert smtp.data(message())[0] == 554
    assert next_hop.deliveries == []
