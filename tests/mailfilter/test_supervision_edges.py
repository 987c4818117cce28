"""`runfilter` with several worker processes: what the parent and its workers do when the
other side goes away, or a stop comes at an awkward moment.

Each test runs the real `manage.py runfilter` (tests/mailfilter/processes.py) in front of
the recording next hop; which processes there are is read from /proc.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.mailfilter.processes import children, listening_inodes, uids
from tests.mailfilter.test_reload import write_profiles
from tests.ports import free_port, wait_for


def _gone(pids: list[int]) -> None:
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    assert not alive, alive


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "Z"


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_worker_processes_stop_when_their_parent_is_killed(runfilter, next_hop):
    """SIGKILL to the parent (the OOM killer, `kill -9`): its worker processes do not go
    on serving as orphans that nothing supervises, that `filterctl stop` cannot reach
    (the pid file names the dead parent) and that a new `runfilter` would share the port
    with. They stop by themselves, and the port closes."""
    worker = runfilter(FILTER_PROCESSES="2")
    pids = worker.workers(2)
    worker.send(4)
    assert len(next_hop.deliveries) == 4
    try:
        worker.process.kill()
        worker.process.wait(10)
        wait_for(lambda: _gone(pids), 10)
        assert not listening_inodes(worker.port)
        with socket.socket() as probe:
            probe.settimeout(5)
            assert probe.connect_ex(("127.0.0.1", worker.port)) != 0
    finally:
        _kill_all(pids)


def test_a_stop_just_after_a_worker_process_was_replaced_is_a_clean_stop(runfilter):
    """SIGTERM reaching the parent while it is starting a replacement worker process: the
    new process, not yet serving, gets the SIGTERM passed on before it set up its own
    handling. It stops as the others do, and the command exits 0 instead of reporting a
    failed worker process."""
    worker = runfilter(FILTER_PROCESSES="2")
    pids = worker.workers(2)
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while not set(children(worker.pid)) - set(pids):
        assert time.monotonic() < deadline, "no replacement started"
        time.sleep(0.0005)
    worker.process.send_signal(signal.SIGTERM)
    code = worker.process.wait(20)
    err = worker.process.stderr.read()
    assert code == 0, err[-2000:]
    assert "worker processes failed" not in err


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_a_signal_right_after_the_start_as_root_reaches_every_worker_process(
    runfilter, tmp_path, signum
):
    """Started as root with FILTER_USER: a `filterctl reload` or stop that comes as soon as
    the command says it listens reaches every worker process. The parent, already running
    as FILTER_USER, is never left with a worker process still running as root, to which it
    may not send signals (EPERM would end the parent with a traceback and leave the
    workers unsupervised)."""
    nobody = pwd.getpwnam("nobody").pw_uid
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    worker = runfilter(FILTER_PROCESSES="4", FILTER_USER="nobody",
                       FILTER_PID_FILE=str(run / "filter.pid"))
    worker.process.send_signal(signum)
    if signum == signal.SIGHUP:
        time.sleep(1)
        assert worker.process.poll() is None, worker.process.stderr.read()[-2000:]
        pids = worker.workers(4)
        assert all(uids(pid) == [nobody] * 4 for pid in pids)
        worker.send(4)
        worker.process.send_signal(signal.SIGTERM)
    code = worker.process.wait(20)
    err = worker.process.stderr.read()
    assert code == 0, err[-2000:]
    assert "Traceback" not in err and "PermissionError" not in err
    assert not (run / "filter.pid").exists()


def test_a_reload_that_cannot_read_the_profile_directory_keeps_the_command_running(
    runfilter, tmp_path, request
):
    """Started as root, the profiles load; the parent and its workers then run as
    FILTER_USER, which may list the profile directory but not look at its entries (mode
    0744). A reload fails there, with the directory named in the log, and the profiles in
    use stay: the parent does not die of it, taking every worker process with it."""
    # Outside tmp_path, whose parents FILTER_USER may not enter.
    top = Path(tempfile.mkdtemp(prefix="profiles-"))
    request.addfinalizer(lambda: shutil.rmtree(top))
    top.chmod(0o755)
    profiles = top / "profiles"
    write_profiles(profiles, "reject=1\n")
    profiles.chmod(0o744)
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    worker = runfilter(FILTER_PROCESSES="2", FILTER_USER="nobody", PROFILE_DIR=str(profiles),
                       FILTER_PID_FILE=str(run / "filter.pid"))
    pids = worker.workers(2)
    worker.send(2, expect=554)
    worker.process.send_signal(signal.SIGHUP)
    time.sleep(2)
    assert worker.process.poll() is None, worker.process.stderr.read()[-3000:]
    assert sorted(children(worker.pid)) == sorted(pids)
    worker.send(4, expect=554)  # the profiles in use stay
    assert worker.stop() == 0
    err = worker.process.stderr.read()
    assert err.count("reload failed, the profiles in use stay") == 2, err[-3000:]
    assert f"{profiles}/Medium" in err and "Traceback" not in err


def test_concurrent_scrapes_do_not_queue_behind_a_worker_process_that_does_not_answer(
    runfilter,
):
    """One worker process hung (SIGSTOP): the first scrape waits for it a moment and
    counts its last snapshot; the scrapes after it, eight of them at once, do not each wait
    that moment again one after the other (the eighth would be answered after eight
    seconds, past a Prometheus scrape timeout, while the parent does nothing else)."""
    metrics = f"127.0.0.1:{free_port()}"
    worker = runfilter(FILTER_PROCESSES="2", FILTER_METRICS_LISTEN=metrics)
    pids = worker.workers(2)
    owners = worker.send(10, workers=pids)
    assert worker.metrics()["messages_passed_total"] == 10
    hung = owners[0]
    os.kill(hung, signal.SIGSTOP)
    try:
        assert worker.metrics()["messages_passed_total"] == 10
        answers: list[tuple[float, int]] = []

        def scrape() -> None:
            started = time.monotonic()
            passed = worker.metrics()["messages_passed_total"]
            answers.append((time.monotonic() - started, passed))

        threads = [threading.Thread(target=scrape) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert [passed for _, passed in answers] == [10] * 8
        assert max(took for took, _ in answers) < 2.5, sorted(answers)
    finally:
        os.kill(hung, signal.SIGCONT)
    # Running again, it answers again: its new counts show at once.
    worker.send(10)
    assert worker.metrics()["messages_passed_total"] == 20
