"""Reloading profiles and signatures: `FilterChecks.reload`, and SIGHUP to a running
`manage.py runfilter` sent by `manage.py filterctl reload`, with a connection kept open
across the reload."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from mailfilter.config import FilterConfig
from mailfilter.policy import FilterChecks
from mailfilter.profiles import ProfileError
from tests.mailfilter.processes import start_runfilter
from tests.mailfilter.test_policy import message


def write_profiles(directory: Path, medium: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "Medium").write_text(medium)
    (directory / "Relay").write_text("reject_score=10\n")


def test_reload_swaps_profiles_and_a_broken_one_keeps_the_old(tmp_path):
    profiles = tmp_path / "profiles"
    write_profiles(profiles, "reject_score=5\n")
    checks = FilterChecks(FilterConfig(profile_dir=str(profiles)))
    before = asyncio.run(checks.lookup.profile_for("alice@example.test"))
    assert before.reject_score == 5

    write_profiles(profiles, "reject_score=3\n")
    checks.reload()
    assert asyncio.run(checks.lookup.profile_for("alice@example.test")).reject_score == 3

    (profiles / "Medium").write_text("reject_score=3\nbogus=1\n")
    with pytest.raises(ProfileError, match=r"Medium:2: unknown variable 'bogus'"):
        checks.reload()
    assert asyncio.run(checks.lookup.profile_for("alice@example.test")).reject_score == 3
    assert checks.stats.get("reloads", "ok") == 1
    assert checks.stats.get("reloads", "failed") == 1


def test_reload_with_a_broken_signature_file_keeps_the_old_set(tmp_path):
    profiles = tmp_path / "profiles"
    (tmp_path / "local.sigs").write_text("Test-Sig=text:badbadbad\n")
    write_profiles(profiles, f"virus_scan=1,{tmp_path / 'local.sigs'}\n")
    checks = FilterChecks(FilterConfig(profile_dir=str(profiles)))
    library = checks.policy.signatures
    (tmp_path / "local.sigs").write_text("Test-Sig=zz\n")
    with pytest.raises(ValueError, match=r"local.sigs:1:"):
        checks.reload()
    assert checks.policy.signatures is library


@pytest.fixture
def worker(tmp_path, next_hop, monkeypatch):
    profiles = tmp_path / "profiles"
    write_profiles(profiles, "reject_score=5\n")
    pid_file = tmp_path / "filter.pid"
    monkeypatch.setenv("FILTER_PID_FILE", str(pid_file))
    process = start_runfilter({
        "FILTER_NEXT_HOP": f"127.0.0.1:{next_hop.port}",
        "QUARANTINE_DIR": str(tmp_path / "q"),
        "PROFILE_DIR": str(profiles),
        "FILTER_PID_FILE": str(pid_file),
    })
    line = process.stdout.readline()
    assert "filter listening on" in line, line + process.stderr.read()
    process.port = int(line.split(",")[0].rsplit(":", 1)[1])
    process.profiles = profiles
    process.pid_file = pid_file
    yield process
    if process.poll() is None:
        process.kill()
    process.wait(10)
    process.stdout.close()
    process.stderr.close()


def transaction(client, recipient: str = "alice@example.test") -> None:
    assert client.command(b"MAIL FROM:<sender@remote.example>")[:3] == b"250"
    assert client.command(f"RCPT TO:<{recipient}>".encode())[:3] == b"250"
    assert client.command(b"DATA")[:3] == b"354"


def test_filterctl_reload_swaps_profiles_without_dropping_connections(worker, next_hop, raw):
    assert worker.pid_file.read_text().strip() == str(worker.pid)
    client = raw(worker.port, timeout=10)
    assert client.reply()[:3] == b"220"
    assert client.command(b"EHLO client.test")[:3] == b"250"
    transaction(client)

    write_profiles(worker.profiles, "reject=1\n")
    call_command("filterctl", "reload")
    time.sleep(1)
    # The transaction begun before the reload keeps its profile...
    assert client.command(message() + b".")[:3] == b"250"
    assert len(next_hop.deliveries) == 1
    # ...and the next one on the same connection gets the new one.
    transaction(client)
    assert client.command(message() + b".")[:3] == b"554"

    # A broken profile: the reload is refused, the profiles in use stay.
    (worker.profiles / "Medium").write_text("reject=1\nreject_score=lots\n")
    call_command("filterctl", "reload")
    time.sleep(1)
    transaction(client)
    assert client.command(message() + b".")[:3] == b"554"
    assert client.command(b"QUIT")[:3] == b"221"

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    log = worker.stderr.read()
    assert f"{worker.profiles / 'Medium'}:2: reject_score: expected a number" in log
    assert not worker.pid_file.exists()


def test_a_broken_profile_refuses_the_start_with_file_line_and_reason(tmp_path):
    profiles = tmp_path / "profiles"
    write_profiles(profiles, "# comment\nreject_score=5\nfilename_reject=\n")
    process = start_runfilter({"PROFILE_DIR": str(profiles),
                          "FILTER_PID_FILE": str(tmp_path / "filter.pid")})
    try:
        _, err = process.communicate(timeout=30)
    finally:
        process.stdout.close()
        process.stderr.close()
    assert process.returncode != 0
    assert f"{profiles / 'Medium'}:3: filename_reject: empty value" in err
    assert not (tmp_path / "filter.pid").exists()


def test_filterctl_without_a_running_worker_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("FILTER_PID_FILE", str(tmp_path / "none.pid"))
    with pytest.raises(CommandError, match="is runfilter running"):
        call_command("filterctl", "reload")


def test_filterctl_does_not_signal_a_process_that_is_not_runfilter(tmp_path, monkeypatch):
    """A pid file left behind names a number the system may since have given to another
    process: filterctl refuses to signal it and says the file is stale."""
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "filter.pid").write_text(f"{other.pid}\n")
        monkeypatch.setenv("FILTER_PID_FILE", str(tmp_path / "filter.pid"))
        with pytest.raises(CommandError, match="is not runfilter"):
            call_command("filterctl", "reload")
        assert other.poll() is None  # not hung up on
    finally:
        other.kill()
        other.wait()
