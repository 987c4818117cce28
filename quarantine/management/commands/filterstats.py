"""Print the filter worker's counters, read from its metrics endpoint (with several
worker processes, the sums over all of them, which their parent serves)."""

from __future__ import annotations

import asyncio
import os

from django.core.management.base import BaseCommand, CommandError

from mailfilter.config import ConfigError, FilterConfig
from mailfilter.stats import fetch_metrics, parse_metrics


class Command(BaseCommand):
    help = "Print the counters of a running filter worker (FILTER_METRICS_LISTEN)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--address", help="host:port of the metrics endpoint (default FILTER_METRICS_LISTEN)"
        )

    def handle(self, *args, **options):
        environ = dict(os.environ)
        if options["address"]:
            environ["FILTER_METRICS_LISTEN"] = options["address"]
        try:
            config = FilterConfig.from_env(environ)
        except ConfigError as exc:
            raise CommandError(str(exc)) from exc
        if not config.metrics_enabled:
            raise CommandError("FILTER_METRICS_LISTEN is not set and no --address was given")
        try:
            text = asyncio.run(fetch_metrics(config.metrics_host, config.metrics_port))
        except (OSError, TimeoutError) as exc:
            raise CommandError(
                f"cannot read {config.metrics_host}:{config.metrics_port}/metrics: {exc}"
            ) from exc
        prefix = "spamviewer_filter_"
        for key, value in parse_metrics(text).items():
            name = key[len(prefix):] if key.startswith(prefix) else key
            self.stdout.write(f"{name} {value}")
