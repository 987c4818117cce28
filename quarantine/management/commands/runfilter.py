"""Start the filter worker (mailfilter) with the Django quarantine sink.

Configuration comes from FILTER_* variables (docs/configuration.md). Started as root, the
worker binds its sockets first and then runs as FILTER_USER. With FILTER_PROCESSES=N the
command binds N sockets to the same address with SO_REUSEPORT, forks one worker per
socket (the kernel spreads connections over them) and waits for them, passing SIGTERM
and SIGINT on. `--postfix-config` prints the Postfix settings for the configured mode.

The profiles (PROFILE_DIR) and their signature files are loaded before anything listens: a
file that does not load stops the start with its path, line and reason. The pid of the
command is written to FILTER_PID_FILE (`var/filter.pid` by default); SIGHUP to it
(`manage.py filterctl reload`) reloads profiles and signatures in every worker process
without closing a connection, and a reload that fails keeps the ones in use and logs why.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import traceback
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from mailfilter.checks.virus import SignatureError
from mailfilter.config import ConfigError, FilterConfig, postfix_snippet
from mailfilter.policy import FilterChecks
from mailfilter.profiles import ProfileError
from mailfilter.server import FilterServer, listening_sockets, run_worker, tls_context
from quarantine.sink import DjangoQuarantineSink

log = logging.getLogger("mailfilter.reload")


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


def drop_privileges(user: str) -> None:
    """Become `user` (and its groups) for good; only possible, and only done, as root."""
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise CommandError(f"FILTER_USER={user!r}: no such user") from None
    if os.getuid() != 0:
        if os.getuid() == entry.pw_uid:
            return
        raise CommandError(f"FILTER_USER={user!r}: only root can switch users")
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    os.setgroups(sorted({entry.pw_gid, *groups}))
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.getuid() != entry.pw_uid or os.geteuid() != entry.pw_uid:
        raise CommandError("could not drop privileges")


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
            self.stdout.write(postfix_snippet(config).text(), ending="")
            return
        user = os.environ.get("FILTER_USER", "")
        try:
            # Loaded here once to say what is wrong before anything binds; each worker
            # process loads its own.
            tls_context(config)
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
            for sock in sockets:
                sock.close()
            raise CommandError(f"FILTER_PID_FILE={pid_file}: {exc.strerror or exc}") from exc
        try:
            if len(sockets) == 1:
                run_worker(self._run(config, sockets[0], user, checks))
                return
            self._run_processes(config, sockets, user, checks)
        finally:
            # Only the command that wrote it removes it (not a forked worker).
            with contextlib.suppress(OSError):
                if pid_file.read_text().strip() == str(os.getpid()):
                    pid_file.unlink()

    def _announce(self, config: FilterConfig, port: int) -> None:
        self.stdout.write(
            f"filter listening on {config.listen_host}:{port}, "
            f"next hop {config.next_hop_host}:{config.next_hop_port}",
        )
        self.stdout.flush()

    def _run_processes(
        self, config: FilterConfig, sockets: list, user: str, checks: FilterChecks
    ) -> None:
        children = []
        for sock in sockets:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    for other in sockets:
                        if other is not sock:
                            other.close()
                    run_worker(self._run(config, sock, user, checks, announce=False))
                    code = 0
                except BaseException:
                    # os._exit below would take the reason with it.
                    traceback.print_exc()
                finally:
                    os._exit(code)
            children.append(pid)
        port = sockets[0].getsockname()[1]
        for sock in sockets:
            sock.close()
        if user:
            drop_privileges(user)

        def forward(signum, frame):
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGHUP, forward)
        self._announce(config, port)
        failed = 0
        for pid in children:
            _, status = os.waitpid(pid, 0)
            failed += os.waitstatus_to_exitcode(status) != 0
        if failed:
            raise CommandError(f"{failed} of {len(children)} worker processes failed")

    async def _run(
        self, config: FilterConfig, sock, user: str, checks: FilterChecks, *,
        announce: bool = True,
    ):
        server = FilterServer(
            config, sink=DjangoQuarantineSink(), sock=sock, policy=checks.policy,
            lookup=checks.lookup, stats=checks.stats,
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
        if announce:
            self._announce(config, server.port)
        try:
            await stop.wait()
        finally:
            await server.stop()
