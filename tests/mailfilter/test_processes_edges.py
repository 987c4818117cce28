"""`runfilter` with several worker processes (FILTER_PROCESSES), as an operator runs it.

One metrics endpoint sums the counters of every worker process, and keeps the counts of a
process that died. A worker process that dies is replaced, on the same listening socket, and
`filterctl reload` reaches the replacement too. A worker process that keeps dying at start
stops the command with an error. Started as root with FILTER_USER, the workers run as that
user, a replacement still loads a certificate only root can read, and the pid file is
removed at stop.

Each test runs the real `manage.py runfilter` (tests/mailfilter/processes.py) in front of
the recording next hop, and sends real SMTP sessions. Which process took a connection is
read from /proc: the process that holds the server side of the connection's socket.
"""

from __future__ import annotations

import os
import pwd
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.core.management import call_command

from tests.mailfilter.processes import (
    MESSAGE,
    ROOT,
    Runfilter,
    children,
    listening_inodes,
    owner,
    socket_inodes,
    start_runfilter,
    stop_process,
    uids,
)
from tests.mailfilter.test_reload import write_profiles
from tests.ports import free_port, wait_for

# -- one endpoint for every worker process -------------------------------------------------


def test_one_metrics_endpoint_sums_the_counters_of_every_worker_process(runfilter, next_hop):
    """FILTER_METRICS_LISTEN with FILTER_PROCESSES=2: one endpoint, whose counters are the
    sums over both worker processes; `manage.py filterstats` prints those sums."""
    metrics = f"127.0.0.1:{free_port()}"
    worker = runfilter(FILTER_PROCESSES="2", FILTER_METRICS_LISTEN=metrics)
    pids = worker.workers(2)
    owners = worker.send(40, workers=pids)
    assert set(owners) == set(pids), owners  # the kernel gave each process some
    assert len(next_hop.deliveries) == 40

    values = worker.metrics()
    assert values["connections_total"] == 40
    assert values["messages_received_total"] == 40
    assert values["messages_passed_total"] == 40
    assert values["next_hop_attempts_total"] == 40
    # Per label too: the message lacks a Date and a Message-ID (delivered, marked).
    assert values['verdicts_total{category="BADH"}'] == 40
    assert values['badh_defects_total{defect="missing-header"}'] == 40
    assert values["bytes_accepted_total"] == values["bytes_received_total"] > 0

    result = subprocess.run(
        [sys.executable, "manage.py", "filterstats"], cwd=ROOT, capture_output=True,
        text=True, timeout=60,
        env={**os.environ, "FILTER_METRICS_LISTEN": metrics, "SPAMVIEWER_IGNORE_DOTENV": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "messages_passed_total 40" in lines
    assert "connections_total 40" in lines


def test_a_scrape_does_not_hang_on_a_worker_process_that_does_not_answer(runfilter):
    """A stopped (hung) worker process cannot answer the endpoint: the scrape answers
    within a few seconds all the same, with that process's last counts."""
    metrics = f"127.0.0.1:{free_port()}"
    worker = runfilter(FILTER_PROCESSES="2", FILTER_METRICS_LISTEN=metrics)
    pids = worker.workers(2)
    owners = worker.send(20, workers=pids)
    assert worker.metrics()["messages_passed_total"] == 20
    hung = owners[0]
    os.kill(hung, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert worker.metrics()["messages_passed_total"] == 20
        assert time.monotonic() - started < 5
    finally:
        os.kill(hung, signal.SIGCONT)
    assert worker.metrics()["messages_passed_total"] == 20


def test_the_parent_endpoint_answers_404_elsewhere_and_is_not_held_by_a_silent_client(
    runfilter,
):
    """The parent's endpoint answers as a worker's does: 404 for any other path. A client
    that connects and sends nothing does not keep others from being answered."""
    metrics = f"127.0.0.1:{free_port()}"
    worker = runfilter(FILTER_PROCESSES="2", FILTER_METRICS_LISTEN=metrics)
    worker.workers(2)
    host, port = metrics.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as silent:
        silent.sendall(b"GET /metr")
        started = time.monotonic()
        assert worker.metrics()["connections_total"] == 0
        assert time.monotonic() - started < 3
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://{metrics}/admin", timeout=5)
        info.value.close()
        assert info.value.code == 404


def test_an_unknown_filter_user_stops_the_start_before_any_worker_process(tmp_path):
    """FILTER_USER naming no user stops the command before it forks anything, with an
    error naming the setting."""
    process = start_runfilter({
        "FILTER_PROCESSES": "2",
        "FILTER_USER": "no-such-user-here",
        "QUARANTINE_DIR": str(tmp_path / "q"),
        "FILTER_PID_FILE": str(tmp_path / "filter.pid"),
    })
    try:
        out, err = process.communicate(timeout=30)
    finally:
        stop_process(process)
    assert process.returncode != 0
    assert "FILTER_USER='no-such-user-here': no such user" in err
    assert "Traceback" not in err and "filter listening" not in out
    assert not (tmp_path / "filter.pid").exists()


# -- a worker process that dies ------------------------------------------------------------


def test_a_killed_worker_process_is_replaced_on_the_same_socket(runfilter, next_hop):
    """SIGKILL to one worker process: mail keeps flowing, a new worker process takes its
    place and accepts connections on the very socket the dead one had (the parent keeps
    it open: connections that arrive in between wait in its backlog)."""
    worker = runfilter(FILTER_PROCESSES="2")
    pids = worker.workers(2)
    sockets = listening_inodes(worker.port)
    assert len(sockets) == 2
    assert socket_inodes(worker.pid) >= sockets  # the parent holds both
    dead = pids[0]
    dead_socket = socket_inodes(dead) & sockets
    assert len(dead_socket) == 1

    os.kill(dead, signal.SIGKILL)
    worker.send(10)  # some of these arrive before the replacement runs
    new = wait_for(lambda: _assert_replaced(worker, pids), 20)
    assert socket_inodes(new) & sockets == dead_socket
    owners = worker.send(30, workers=[pids[1], new])
    assert new in owners and pids[1] in owners
    assert len(next_hop.deliveries) == 40
    assert worker.stop() == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in [pids[1], new])


def _assert_replaced(worker: Runfilter, before: list[int]) -> int:
    now = children(worker.pid)
    assert len(now) == 2 and before[0] not in now and before[1] in now, now
    return next(pid for pid in now if pid not in before)


def test_the_metrics_keep_the_counts_of_a_worker_process_that_died(runfilter):
    """Counters never go backwards while the service runs: the counts of a worker process
    killed with SIGKILL stay in the sums (it reported them to the parent before it died,
    without a scrape in between), and the replacement's counts add to them."""
    metrics = f"127.0.0.1:{free_port()}"
    worker = runfilter(FILTER_PROCESSES="2", FILTER_METRICS_LISTEN=metrics)
    pids = worker.workers(2)
    owners = worker.send(30, workers=pids)
    dead = owners[0]
    time.sleep(2)
    os.kill(dead, signal.SIGKILL)
    seen = [worker.metrics()["messages_passed_total"]]
    assert seen[0] == 30
    worker.send(10)
    seen.append(worker.metrics()["messages_passed_total"])
    wait_for(lambda: _assert_replaced(worker, [dead, *(p for p in pids if p != dead)]), 20)
    worker.send(10)
    seen.append(worker.metrics()["messages_passed_total"])
    assert seen == [30, 40, 50]
    assert worker.metrics()["connections_total"] == 50


def test_filterctl_reload_reaches_a_replaced_worker_process(runfilter, tmp_path, monkeypatch):
    """A replacement started after a reload uses the reloaded profiles, and a reload after
    the replacement started reaches it too."""
    profiles = tmp_path / "profiles"
    write_profiles(profiles, "reject_score=5\n")
    monkeypatch.setenv("FILTER_PID_FILE", str(tmp_path / "filter.pid"))
    worker = runfilter(FILTER_PROCESSES="2", PROFILE_DIR=str(profiles))
    pids = worker.workers(2)

    write_profiles(profiles, "reject=1\n")
    call_command("filterctl", "reload")
    os.kill(pids[0], signal.SIGKILL)
    new = wait_for(lambda: _assert_replaced(worker, pids), 20)
    time.sleep(1)
    owners = worker.send(20, workers=[pids[1], new], expect=554)
    assert new in owners and pids[1] in owners

    write_profiles(profiles, "reject_score=5\n")
    call_command("filterctl", "reload")
    time.sleep(1)
    owners = worker.send(20, workers=[pids[1], new])
    assert new in owners and pids[1] in owners


def test_a_worker_process_that_keeps_dying_at_start_stops_the_command(runfilter, tmp_path):
    """A worker process that dies within its first second, again and again, is not
    restarted for ever: after a few tries (with growing pauses, not a spin) the command
    stops every worker process and fails with an error saying so."""
    worker = runfilter(FILTER_PROCESSES="2")
    pids = worker.workers(2)
    killed: list[int] = []
    known = set(pids)
    os.kill(pids[0], signal.SIGKILL)
    killed.append(pids[0])
    deadline = time.monotonic() + 40
    while worker.process.poll() is None and time.monotonic() < deadline:
        try:
            current = children(worker.pid)
        except OSError:
            break
        for pid in current:
            if pid not in known:
                known.add(pid)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.01)
    assert worker.process.wait(20) != 0
    err = worker.process.stderr.read()
    assert "failed to start 5 times in a row" in err, err[-2000:]
    assert 5 <= len(killed) <= 6, killed
    # The other worker process was stopped with it, and the pid file is gone.
    assert not Path(f"/proc/{pids[1]}").exists()
    assert not (tmp_path / "filter.pid").exists()


# -- started as root -----------------------------------------------------------------------


@pytest.mark.parametrize("processes", ["1", "2"])
def test_the_pid_file_is_removed_at_stop_when_the_worker_runs_as_filter_user(
    runfilter, tmp_path, processes
):
    """Started as root with FILTER_USER=nobody, the worker processes run as nobody, and
    the pid file (in a directory only root may write) is removed at SIGTERM all the
    same."""
    nobody = pwd.getpwnam("nobody").pw_uid
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    pid_file = run / "filter.pid"
    worker = runfilter(FILTER_PROCESSES=processes, FILTER_USER="nobody",
                       FILTER_PID_FILE=str(pid_file))
    workers = [worker.pid] if processes == "1" else worker.workers(2)

    def dropped():
        assert [uids(pid) for pid in workers] == [[nobody] * 4] * len(workers)

    wait_for(dropped, 10)
    assert pid_file.read_text().strip() == str(worker.pid)
    worker.send(4)
    assert worker.stop() == 0
    assert not pid_file.exists()


def test_a_replaced_worker_process_loads_a_certificate_only_root_can_read(
    runfilter, tmp_path, certificate
):
    """The certificate and key are read as root before the workers drop to FILTER_USER;
    a worker process started later (a replacement, forked by a parent that runs as
    FILTER_USER) offers STARTTLS with them all the same."""
    tls = tmp_path / "tls"
    tls.mkdir(mode=0o700)
    cert, key = tls / "cert.pem", tls / "key.pem"
    cert.write_bytes(certificate[0].read_bytes())
    key.write_bytes(certificate[1].read_bytes())
    key.chmod(0o600)
    worker = runfilter(FILTER_PROCESSES="2", FILTER_USER="nobody",
                       FILTER_TLS_CERT=str(cert), FILTER_TLS_KEY=str(key))
    pids = worker.workers(2)
    os.kill(pids[0], signal.SIGKILL)
    new = wait_for(lambda: _assert_replaced(worker, pids), 20)
    time.sleep(1.5)
    assert new in children(worker.pid)
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    served = 0
    for _ in range(30):
        with smtplib.SMTP("127.0.0.1", worker.port, timeout=15) as client:
            if owner(client, worker.port, [pids[1], new]) != new:
                continue
            client.ehlo("client.test")
            assert client.has_extn("starttls")
            assert client.starttls(context=context)[0] == 220
            client.ehlo("client.test")
            client.sendmail("a@remote.example", ["alice@example.test"], MESSAGE)
            served += 1
    assert served


def test_the_pid_file_goes_when_a_command_running_as_filter_user_is_killed(runfilter, tmp_path):
    """Killed with SIGKILL, the command cannot remove its pid file, and as FILTER_USER it
    could not anyway: the file is removed all the same (it would name a pid the system may
    give to another process)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    pid_file = run / "filter.pid"
    worker = runfilter(FILTER_USER="nobody", FILTER_PID_FILE=str(pid_file))
    assert pid_file.read_text().strip() == str(worker.pid)
    worker.process.kill()
    worker.process.wait(10)
    wait_for(lambda: _assert_absent(pid_file), 10)


def _assert_absent(path: Path) -> None:
    assert not path.exists(), path
