"""Start the filter worker (mailfilter) with the Django quarantine sink.

Configuration comes from FILTER_* variables (docs/configuration.md). Started as root, the
worker binds its sockets first and then runs as FILTER_USER. With FILTER_PROCESSES=N the
command binds N sockets to the same address with SO_REUSEPORT, forks one worker per
socket (the kernel spreads connections over them) and waits for them, passing SIGTERM
and SIGINT on. `--postfix-config` prints the Postfix settings for the configured mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from django.core.management.base import BaseCommand, CommandError

from mailfilter.config import ConfigError, FilterConfig, postfix_snippet
from mailfilter.server import FilterServer, listening_sockets
from quarantine.sink import DjangoQuarantineSink


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
            sockets = listening_sockets(config)
        except OSError as exc:
            raise CommandError(
                f"FILTER_LISTEN={config.listen_host}:{config.listen_port}: {exc.strerror}"
            ) from exc
        if len(sockets) == 1:
            asyncio.run(self._run(config, sockets[0], user))
            return
        self._run_processes(config, sockets, user)

    def _announce(self, config: FilterConfig, port: int) -> None:
        self.stdout.write(
            f"filter listening on {config.listen_host}:{port}, "
            f"next hop {config.next_hop_host}:{config.next_hop_port}",
        )
        self.stdout.flush()

    def _run_processes(self, config: FilterConfig, sockets: list, user: str) -> None:
        children = []
        for sock in sockets:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    for other in sockets:
                        if other is not sock:
                            other.close()
                    asyncio.run(self._run(config, sock, user, announce=False))
                    code = 0
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
        self._announce(config, port)
        failed = 0
        for pid in children:
            _, status = os.waitpid(pid, 0)
            failed += os.waitstatus_to_exitcode(status) != 0
        if failed:
            raise CommandError(f"{failed} of {len(children)} worker processes failed")

    async def _run(self, config: FilterConfig, sock, user: str, *, announce: bool = True):
        server = FilterServer(config, sink=DjangoQuarantineSink(), sock=sock)
        await server.start()
        if user:
            drop_privileges(user)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if announce:
            self._announce(config, server.port)
        try:
            await stop.wait()
        finally:
            await server.stop()
