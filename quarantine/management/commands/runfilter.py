"""Start the filter worker (mailfilter) with the Django quarantine sink.

Configuration comes from FILTER_* variables (docs/configuration.md). Started as root, the
worker binds its sockets and loads its TLS certificate and key first and then runs as
FILTER_USER. `--postfix-config` prints the Postfix settings for the configured mode.

With FILTER_PROCESSES=N the command binds N sockets to the same address with SO_REUSEPORT
(the kernel spreads connections over them), forks one worker process per socket and
supervises them (`Supervisor`): it passes SIGTERM, SIGINT and SIGHUP on, starts a new
worker on the same socket when one dies, and serves FILTER_METRICS_LISTEN with the
counters summed over all of them. A worker process whose parent is gone (killed with
SIGKILL, say) stops on its own: nothing would supervise it or reach it through the pid file.

The profiles (PROFILE_DIR) and their signature files are loaded before anything listens: a
file that does not load stops the start with its path, line and reason. The pid of the
command is written to FILTER_PID_FILE (`var/filter.pid` by default) and removed at stop;
SIGHUP to it (`manage.py filterctl reload`) reloads profiles and signatures in every
worker process without closing a connection, and a reload that fails keeps the ones in use
and logs why.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import pwd
import select
import selectors
import signal
import socket
import ssl
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from mailfilter.checks.virus import SignatureError
from mailfilter.config import ConfigError, FilterConfig, postfix_snippet
from mailfilter.policy import FilterChecks
from mailfilter.profiles import ProfileError
from mailfilter.server import FilterServer, listening_sockets, run_worker, tls_context
from mailfilter.stats import (
    MetricsEndpoint,
    ProcessCounters,
    SnapshotReporter,
    listening_socket,
    snapshot_channel,
)
from quarantine.sink import DjangoQuarantineSink

log = logging.getLogger("mailfilter.reload")
processes_log = logging.getLogger("mailfilter.processes")


def pid_file_path() -> Path:
    """FILTER_PID_FILE, or `filter.pid` in the var directory."""
    return Path(os.environ.get("FILTER_PID_FILE") or Path(settings.VAR_DIR) / "filter.pid")


def reload_checks(checks: FilterChecks) -> bool:
    """Reload profiles and signatures; on failure keep the ones in use and log why."""
    try:
        checks.reload()
    except (ProfileError, SignatureError, ValueError) as exc:
        log.error("reload failed, the profiles in use stay: %s", exc)
        return False
    log.info("profiles and signatures reloaded")
    return True


def filter_user(user: str) -> pwd.struct_passwd:
    """FILTER_USER's entry, once it is known that this process may become it."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise CommandError(f"FILTER_USER={user!r}: no such user") from None
    if os.getuid() not in (0, entry.pw_uid):
        raise CommandError(f"FILTER_USER={user!r}: only root can switch users")
    return entry


def drop_privileges(user: str) -> None:
    """Become `user` (and its groups) for good; only possible, and only done, as root."""
    import grp

    entry = filter_user(user)
    if os.getuid() == entry.pw_uid:
        return
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    os.setgroups(sorted({entry.pw_gid, *groups}))
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.getuid() != entry.pw_uid or os.geteuid() != entry.pw_uid:
        raise CommandError("could not drop privileges")


class PidFileKeeper:
    """Removes the pid file of a command that runs as FILTER_USER.

    The pid file is written as root, usually in a directory only root may write to, where
    FILTER_USER cannot unlink it. So a process of its own keeps root for that one task: it
    is forked before privileges are dropped, leaves the command's process tree (no worker
    process counts it among the command's children), closes everything it inherited but
    two pipes, ignores the stop signals, and waits. It removes the file when the command
    asks at stop (`finish`, which waits for it to be done) or when the command is gone
    without asking (killed: its end of the pipe closes), and only while the file still
    names the command.
    """

    def __init__(self, request: int, answer: int) -> None:
        self._request = request
        self._answer = answer

    @classmethod
    def start(cls, path: Path) -> PidFileKeeper:
        pid = os.getpid()
        request_r, request_w = os.pipe()
        answer_r, answer_w = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                if os.fork() == 0:
                    _keep_pid_file(path, pid, request_r, answer_w)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        os.close(request_r)
        os.close(answer_w)
        return cls(request_w, answer_r)

    def finish(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError):
            os.write(self._request, b".")
            ready, _, _ = select.select([self._answer], [], [], timeout)
            if ready:
                os.read(self._answer, 1)
        self.close()

    def close(self) -> None:
        """Close the command's ends (in a forked worker process: its copies)."""
        for fd in (self._request, self._answer):
            with contextlib.suppress(OSError):
                os.close(fd)


def _keep_pid_file(path: Path, pid: int, request: int, answer: int) -> None:
    try:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        # The listening sockets above all: a port must close when the command is gone.
        for name in os.listdir("/proc/self/fd"):
            if int(name) not in (0, 1, 2, request, answer):
                with contextlib.suppress(OSError):
                    os.close(int(name))
        with contextlib.suppress(OSError):
            os.read(request, 1)
        with contextlib.suppress(OSError):
            if path.read_text().strip() == str(pid):
                path.unlink()
        with contextlib.suppress(OSError):
            os.write(answer, b".")
    finally:
        os._exit(0)


# A worker process that dies within START_GRACE seconds of its start failed to start;
# FAILED_STARTS of those in a row, for one socket, stop the command. Before another
# worker starts there is a pause: RESTART_DELAY, doubled for each death in a row that came
# within STABLE seconds of the start, up to MAX_RESTART_DELAY. Meanwhile its socket stays
# open in the parent and connections wait in its backlog.
START_GRACE = 1.0
FAILED_STARTS = 5
RESTART_DELAY = 0.25
MAX_RESTART_DELAY = 10.0
STABLE = 60.0

_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
_WAKE = object()


@dataclass
class _Slot:
    """One listening socket and the worker process that accepts on it."""

    number: int
    sock: socket.socket
    pid: int = 0
    started: float = 0.0
    failed_starts: int = 0
    deaths: int = 0
    restart_at: float | None = None


class Supervisor:
    """The parent of FILTER_PROCESSES worker processes.

    It keeps every listening socket open, so that a new worker process takes over the
    socket of one that died: with SO_REUSEPORT each socket of the group gets its share of
    new connections, and a socket nobody accepts on would keep its share waiting. It runs a
    plain `selectors` loop (no asyncio, no threads: a process forked from it must be able
    to close everything it holds, and nothing it holds may be locked by another thread)
    over the metrics endpoint, the workers' snapshot channels and the signals it handles.
    """

    def __init__(
        self,
        command: Command,
        config: FilterConfig,
        sockets: list[socket.socket],
        user: str,
        checks: FilterChecks,
        *,
        tls: ssl.SSLContext | None,
        metrics: socket.socket | None,
        keeper: PidFileKeeper | None,
    ) -> None:
        self.command = command
        self.config = config
        # The parent serves the metrics; each worker process only reports to it.
        self.worker_config = config.with_changes(metrics_host="", metrics_port=0)
        self.slots = [_Slot(number, sock) for number, sock in enumerate(sockets, 1)]
        self.port = sockets[0].getsockname()[1]
        self.user = user
        self.checks = checks
        self.tls = tls
        self.keeper = keeper
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        # Only this process holds the write end (each worker process closes its copy):
        # when this process is gone, however it went, the read end of every worker
        # process sees end of file and that worker stops.
        self.lifeline_r, self.lifeline_w = os.pipe()
        self.counters = ProcessCounters() if metrics is not None else None
        self.endpoint = (
            MetricsEndpoint(metrics, self._render) if metrics is not None else None
        )
        self.pending: list[int] = []
        self.stopping = False
        self.error = ""
        self.failed = 0

    def run(self) -> None:
        self._install()
        try:
            # Before the first fork: a worker process must never run as another user than
            # this process, which could then not pass a signal on to it (EPERM). A worker
            # process needs nothing of root's: its socket is bound, its TLS key loaded.
            if self.user:
                drop_privileges(self.user)
            for slot in self.slots:
                self._start(slot)
            self.command._announce(self.config, self.port)
            self._loop()
        except BaseException:
            self._stop(signal.SIGTERM)
            for slot in self.slots:
                if slot.pid:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(slot.pid, 0)
            raise
        finally:
            self._uninstall()
        if self.error:
            raise CommandError(self.error)
        if self.failed:
            raise CommandError(f"{self.failed} of {len(self.slots)} worker processes failed")

    # -- the loop ------------------------------------------------------------------------

    def _install(self) -> None:
        for sock in (self.wake_r, self.wake_w):
            sock.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, _WAKE)
        if self.endpoint is not None:
            self.endpoint.register(self.selector)
        self._previous_wakeup = signal.set_wakeup_fd(
            self.wake_w.fileno(), warn_on_full_buffer=False
        )
        self._previous = {signum: signal.signal(signum, self._signal) for signum in _HANDLED}

    def _uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_wakeup)
        self.selector.close()
        for sock in (self.wake_r, self.wake_w):
            sock.close()
        for fd in (self.lifeline_r, self.lifeline_w):
            os.close(fd)
        if self.endpoint is not None:
            self.endpoint.close()
        if self.counters is not None:
            self.counters.close()
        for slot in self.slots:
            slot.sock.close()

    def _signal(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def _loop(self) -> None:
        while not self.stopping or any(slot.pid for slot in self.slots):
            for key, mask in self.selector.select(self._timeout()):
                if key.data is _WAKE:
                    with contextlib.suppress(OSError):
                        while self.wake_r.recv(512):
                            pass
                elif key.data is self.endpoint:
                    self.endpoint.handle(key, mask)
                elif self.counters is not None and not self.counters.read(key.data):
                    # Its worker end closed; the process is reaped below.
                    self.selector.unregister(key.fileobj)
            self._signals()
            self._reap()
            if not self.stopping:
                now = time.monotonic()
                for slot in self.slots:
                    if slot.restart_at is not None and slot.restart_at <= now:
                        slot.restart_at = None
                        self._start(slot)
            if self.endpoint is not None:
                self.endpoint.expire()

    def _timeout(self) -> float | None:
        if self.pending:
            return 0
        deadlines = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        if self.endpoint is not None and self.endpoint.next_deadline() is not None:
            deadlines.append(self.endpoint.next_deadline())
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _signals(self) -> None:
        while self.pending:
            signum = self.pending.pop(0)
            if signum == signal.SIGCHLD:
                continue
            if signum == signal.SIGHUP:
                self._forward(signum)
                # A worker process started later is forked from this process: it must
                # start with what the running ones reloaded (or kept, when the reload
                # failed, which they log). Whatever the reload meets, this process, which
                # supervises them all, goes on.
                try:
                    self.checks.reload()
                except (ProfileError, SignatureError, ValueError):
                    pass
                except Exception:
                    log.exception("reload failed in the parent process, the profiles in "
                                  "use stay for the worker processes it starts")
            else:
                self._stop(signum)

    def _forward(self, signum: int) -> None:
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signum)

    def _stop(self, signum: int) -> None:
        if not self.stopping:
            self.stopping = True
            # Nothing starts on them any more: a port that no worker process accepts on
            # refuses connections at once instead of keeping them waiting.
            for slot in self.slots:
                slot.restart_at = None
                slot.sock.close()
        self._forward(signum)

    # -- worker processes ----------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for slot in self.slots:
                if slot.pid == pid:
                    self._gone(slot, os.waitstatus_to_exitcode(status))
                    break

    def _gone(self, slot: _Slot, code: int, how: str = "") -> None:
        pid, slot.pid = slot.pid, 0
        if self.counters is not None:
            channel = self.counters.channel(pid)
            if channel is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(channel)
            self.counters.retire(pid)
        if self.stopping:
            self.failed += code != 0
            return
        lived = time.monotonic() - slot.started
        how = how or _exit_status(code)
        slot.failed_starts = slot.failed_starts + 1 if lived < START_GRACE else 0
        if slot.failed_starts >= FAILED_STARTS:
            self.error = (
                f"worker process {slot.number} failed to start {FAILED_STARTS} times in a "
                f"row (last: {how}); stopping"
            )
            processes_log.error("%s", self.error)
            self._stop(signal.SIGTERM)
            return
        slot.deaths = 1 if lived >= STABLE else slot.deaths + 1
        delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (slot.deaths - 1))
        slot.restart_at = time.monotonic() + delay
        processes_log.error(
            "worker process %d (pid %d) %s after %.1f s; starting another in %.2f s",
            slot.number, pid, how, lived, delay,
        )

    def _start(self, slot: _Slot) -> None:
        parent_end, worker_end = (
            snapshot_channel() if self.counters is not None else (None, None)
        )
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for end in (parent_end, worker_end):
                if end is not None:
                    end.close()
            if not any(other.pid for other in self.slots):
                raise CommandError(f"cannot start a worker process: {exc}") from exc
            # Counts as a failed start: the pause grows, and it does not go on for ever.
            slot.started = time.monotonic()
            self._gone(slot, 1, f"could not be forked ({exc.strerror or exc})")
            return
        if pid == 0:
            code = 1
            try:
                early = self._become_worker(slot, parent_end, mask)
                run_worker(self.command._run(
                    self.worker_config, slot.sock, self.user, self.checks, tls=self.tls,
                    channel=worker_end, early=early, parent=self.lifeline_r,
                    announce=False,
                ))
                code = 0
            except BaseException:
                # os._exit below would take the reason with it.
                traceback.print_exc()
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        slot.pid = pid
        slot.started = time.monotonic()
        if parent_end is not None and worker_end is not None and self.counters is not None:
            worker_end.close()
            self.counters.add(pid, parent_end)
            self.selector.register(parent_end, selectors.EVENT_READ, pid)

    def _become_worker(
        self, slot: _Slot, parent_end: socket.socket | None, mask: set
    ) -> list[int]:
        """In the forked worker process: the signals back to a worker's, and everything of
        the parent's closed but this worker's socket and the read end of the lifeline (an
        inherited copy of a metrics client's connection, say, would keep that client from
        seeing the end of its answer). Returns the list of the stop and reload signals
        that come before the worker's event loop takes them: a SIGTERM passed on by a
        parent told to stop just after it forked this process must stop the worker as it
        stops the others, not kill it (which the parent would count as a failure)."""
        early: list[int] = []

        def keep(signum: int, frame: object) -> None:
            early.append(signum)

        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, keep)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()
        os.close(self.lifeline_w)
        if self.endpoint is not None:
            self.endpoint.close()
        if self.counters is not None:
            self.counters.close()
        if parent_end is not None:
            parent_end.close()
        for other in self.slots:
            if other is not slot:
                other.sock.close()
        if self.keeper is not None:
            self.keeper.close()
        # What the parent counted (its own reloads) is not this worker's.
        self.checks.stats.clear()
        return early

    def _render(self) -> str:
        assert self.counters is not None
        return self.counters.collect().render()


def _parent_gone(loop: asyncio.AbstractEventLoop, lifeline: int, stop: asyncio.Event) -> None:
    """The lifeline is readable: its write end closed, so the parent process is gone
    (killed: SIGKILL leaves it no time to stop its workers). A worker without its parent
    is not supervised and not reachable through the pid file: it stops."""
    try:
        if os.read(lifeline, 64):
            return
    except BlockingIOError:
        return
    except OSError:
        pass
    loop.remove_reader(lifeline)
    processes_log.error("the parent process is gone; this worker process stops")
    stop.set()


def _exit_status(code: int) -> str:
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


class Command(BaseCommand):
    help = "Run the SMTP filter worker."

    def add_arguments(self, parser):
        parser.add_argument(
            "--postfix-config", action="store_true",
            help="print the main.cf and master.cf settings for FILTER_MODE and exit",
        )

    def handle(self, *args, **options):
        try:
            config = FilterConfig.from_env()
        except ConfigError as exc:
            raise CommandError(str(exc)) from exc
        if options["postfix_config"]:
            try:
                snippet = postfix_snippet(config)
            except ConfigError as exc:
                raise CommandError(str(exc)) from exc
            self.stdout.write(snippet.text(), ending="")
            return
        user = os.environ.get("FILTER_USER", "")
        entry = filter_user(user) if user else None
        dropping = entry is not None and os.getuid() == 0 and entry.pw_uid != 0
        try:
            # Loaded once, before privileges are dropped (a key only root may read), and
            # given to every worker process, also to one started later.
            tls = tls_context(config)
        except ConfigError as exc:
            raise CommandError(str(exc)) from exc
        try:
            checks = FilterChecks(config)
        except (ProfileError, SignatureError, ValueError) as exc:
            raise CommandError(f"profiles: {exc}") from exc
        try:
            sockets = listening_sockets(config)
        except OSError as exc:
            raise CommandError(
                f"FILTER_LISTEN={config.listen_host}:{config.listen_port}: {exc.strerror}"
            ) from exc
        metrics = None
        if config.processes > 1 and config.metrics_enabled:
            try:
                metrics = listening_socket(config.metrics_host, config.metrics_port)
            except OSError as exc:
                for sock in sockets:
                    sock.close()
                raise CommandError(
                    f"FILTER_METRICS_LISTEN={config.metrics_host}:{config.metrics_port}: "
                    f"{exc.strerror or exc}"
                ) from exc
        # Django, the profiles and the signatures are loaded for good: the garbage
        # collector need not walk them again after each few hundred messages, and forked
        # workers share their pages.
        gc.collect()
        gc.freeze()
        pid_file = pid_file_path()
        try:
            pid_file.parent.mkdir(parents=True, exist_ok=True)
            pid_file.write_text(f"{os.getpid()}\n")
        except OSError as exc:
            for sock in [*sockets, *([metrics] if metrics else [])]:
                sock.close()
            raise CommandError(f"FILTER_PID_FILE={pid_file}: {exc.strerror or exc}") from exc
        keeper = None
        try:
            if dropping:
                keeper = PidFileKeeper.start(pid_file)
            if len(sockets) == 1:
                run_worker(self._run(config, sockets[0], user, checks, tls=tls))
                return
            Supervisor(
                self, config, sockets, user, checks, tls=tls, metrics=metrics, keeper=keeper
            ).run()
        finally:
            # Only the command that wrote it removes it (not a forked worker).
            with contextlib.suppress(OSError):
                if pid_file.read_text().strip() == str(os.getpid()):
                    pid_file.unlink()
            if keeper is not None:
                keeper.finish()

    def _announce(self, config: FilterConfig, port: int) -> None:
        self.stdout.write(
            f"filter listening on {config.listen_host}:{port}, "
            f"next hop {config.next_hop_host}:{config.next_hop_port}",
        )
        self.stdout.flush()

    async def _run(
        self, config: FilterConfig, sock, user: str, checks: FilterChecks, *,
        tls: ssl.SSLContext | None = None,
        channel: socket.socket | None = None,
        early: list[int] | None = None,
        parent: int | None = None,
        announce: bool = True,
    ):
        """Serve until SIGTERM or SIGINT. In a worker process of a `Supervisor`: `early`
        holds the signals that came before this loop could take them, and `parent` is the
        read end of the parent's lifeline (end of file: the parent is gone)."""
        server = FilterServer(
            config, sink=DjangoQuarantineSink(), sock=sock, policy=checks.policy,
            lookup=checks.lookup, stats=checks.stats, tls=tls,
        )
        await server.start()
        if user:
            drop_privileges(user)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        # Runs on the event loop between two steps of the sessions: a transaction keeps
        # the profile it chose, and no connection is touched.
        loop.add_signal_handler(signal.SIGHUP, reload_checks, checks)
        if early:
            if signal.SIGTERM in early or signal.SIGINT in early:
                stop.set()
            elif signal.SIGHUP in early:
                reload_checks(checks)
        if parent is not None:
            os.set_blocking(parent, False)
            loop.add_reader(parent, _parent_gone, loop, parent, stop)
        reporter = SnapshotReporter(checks.stats, channel) if channel is not None else None
        if reporter is not None:
            reporter.start()
        if announce:
            self._announce(config, server.port)
        try:
            await stop.wait()
        finally:
            try:
                await server.stop()
            finally:
                # The last counts, once no session can add to them.
                if reporter is not None:
                    reporter.close()
