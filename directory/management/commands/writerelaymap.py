from django.core.management.base import BaseCommand, CommandError

from directory.relaymap import RelayMapError, write_relay_map


class Command(BaseCommand):
    help = (
        "Write the Postfix relay_recipient_maps source (RELAY_MAP_PATH) from the addresses "
        "in the database, the directory's extra addresses and RELAY_MAP_EXTRA, then postmap it."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--force",
            action="store_true",
            help="replace the map even when the new one is empty or much smaller",
        )

    def handle(self, *args, force: bool = False, **options):
        try:
            result = write_relay_map(force=force)
        except RelayMapError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(str(result))
