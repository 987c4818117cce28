"""Print the main.cf and master.cf lines that put the filter into Postfix's mail flow.

The lines come from `mailfilter.config.postfix_snippet()`, the function the end-to-end
tests configure their Postfix with, for the worker's FILTER_* settings and the mode
(`--mode`, else FILTER_MODE). Added to them: the relay domains and the server that takes
final delivery (RELAY_DOMAINS, RELAY_NEXT_HOP, written by `manage.py configure`) and the
recipient map the directory sync writes (RELAY_MAP_PATH, of type RELAY_MAP_POSTMAP).
"""

from __future__ import annotations

import ipaddress

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from mailfilter.config import MODES, ConfigError, FilterConfig, postfix_snippet
from spamviewer.env import env_list, env_str

# Types that `postmap` builds a file for; with texthash or none no postmap runs, and only
# texthash reads the text file itself.
_POSTMAP_TYPES = ("hash", "btree", "lmdb", "cdb")


def relay_map_table() -> str:
    """RELAY_MAP_PATH as a Postfix table (`hash:/path`)."""
    kind = settings.RELAY_MAP_POSTMAP
    kind = kind if kind in _POSTMAP_TYPES else "texthash"
    return f"{kind}:{settings.RELAY_MAP_PATH}"


def _on_this_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Command(BaseCommand):
    help = "Print the main.cf and master.cf settings for the filter's mode."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--mode", choices=MODES,
                            help="content_filter (after the queue), proxy_filter (before "
                                 "it) or front; default FILTER_MODE")
        parser.add_argument("--transport", default="spamviewer",
                            help="name of the master.cf service that talks to the filter "
                                 "in content_filter mode (default spamviewer)")
        parser.add_argument("--inbound", default="smtp",
                            help="the smtpd service that gets smtpd_proxy_filter in "
                                 "proxy_filter mode (default smtp)")

    def handle(self, *args, **options) -> None:
        try:
            config = FilterConfig.from_env()
            if options["mode"]:
                config = config.with_changes(mode=options["mode"])
        except ConfigError as exc:
            raise CommandError(str(exc)) from exc
        try:
            snippet = postfix_snippet(
                config,
                inbound=options["inbound"],
                transport=options["transport"],
                relay_domains=tuple(env_list("RELAY_DOMAINS", [])),
                relay_next_hop=env_str("RELAY_NEXT_HOP"),
                relay_map=relay_map_table(),
            )
        except ConfigError as exc:
            raise CommandError(str(exc)) from exc
        header = [f"# Postfix settings for spamviewer, {config.mode} mode."]
        if config.mode == "front":
            header.append(
                "# The filter itself receives the mail and checks the recipients; Postfix "
                "is its next hop."
            )
            if not _on_this_host(config.next_hop_host):
                self.stdout.write(
                    "\n".join(header[:1]) + "\n"
                    f"# The filter delivers to {config.next_hop_host}:"
                    f"{config.next_hop_port} itself: no Postfix on this host is needed.\n"
                )
                return
        self.stdout.write("\n".join(header) + "\n" + snippet.text(), ending="")
