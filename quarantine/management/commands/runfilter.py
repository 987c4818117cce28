"""Start the filter worker (mailfilter) with the Django quarantine sink.

Configuration comes from FILTER_* variables (docs/configuration.md). Started as root, the
worker binds its sockets first and then runs as FILTER_USER.
"""

from __future__ import annotations

import asyncio
import os
import signal

from django.core.management.base import BaseCommand, CommandError

from mailfilter.config import ConfigError, FilterConfig
from mailfilter.server import FilterServer
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

    def handle(self, *args, **options):
        try:
            config = FilterConfig.from_env()
        except ConfigError as exc:
            raise CommandError(str(exc)) from exc
        asyncio.run(self._run(config, os.environ.get("FILTER_USER", "")))

    async def _run(self, config: FilterConfig, user: str) -> None:
        server = FilterServer(config, sink=DjangoQuarantineSink())
        await server.start()
        if user:
            drop_privileges(user)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        self.stdout.write(
            f"filter listening on {config.listen_host}:{server.port}, "
            f"next hop {config.next_hop_host}:{config.next_hop_port}",
        )
        self.stdout.flush()
        try:
            await stop.wait()
        finally:
            await server.stop()
