"""The relay map as a real Postfix reads it: `relay_recipient_maps` pointing at the file
`writerelaymap` (and the directory sync) writes, so that Postfix refuses mail for
addresses that do not exist and takes mail for those that do.

Two ways of reading the map are checked: `hash:` (postmap after each write, the default)
and `texthash:` (no postmap, as the Postfix container reads it), including a texthash map
that does not exist yet, which must defer mail rather than take it for anyone.
"""

from __future__ import annotations

import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command

from directory.models import Address
from tests.e2e.postfix import Postfix, free_ports, requires_postfix, wait_for_port, wait_until

pytestmark = [*requires_postfix, pytest.mark.django_db]


class Inbound:
    """A Postfix that takes mail for example.test on a loopback port and holds it (the
    relay host is a port nobody listens on: accepted mail stays queued)."""

    def __init__(self, table: str) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="sv-relaymap-"))
        self.base.chmod(0o755)
        self.map = self.base / "relay_recipients"
        self.port, nobody = free_ports(2)
        self.postfix = Postfix(self.base)
        self.postfix.configure(relayhost_port=nobody)
        self.postfix.add_smtpd(self.port)
        self.postfix.postconf("-e", f"relay_recipient_maps = {table}:{self.map}")
        self.postfix.postconf("-F", "*/*/chroot=n")

    def start(self) -> None:
        self.postfix.start()
        wait_for_port(self.port)

    def restart_smtpd(self) -> None:
        """A reload: new smtpd processes open the map again (what their max_use or
        max_idle recycling does on its own in time)."""
        self.postfix.reload()

    def rcpt(self, address: str) -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example") as c:
            c.ehlo()
            code, _ = c.mail("sender@remote.example")
            assert code == 250
            code, text = c.rcpt(address)
            return code, text.decode()

    def stop(self) -> None:
        try:
            self.postfix.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def inbound(settings) -> Iterator[callable]:
    made: list[Inbound] = []

    def make(table: str) -> Inbound:
        postfix = Inbound(table)
        made.append(postfix)
        settings.RELAY_MAP_PATH = postfix.map
        settings.RELAY_MAP_DIRECTORY_EXTRA = postfix.base / "relay_extra_directory"
        settings.RELAY_MAP_EXTRA = ""
        settings.RELAY_MAP_POSTMAP = "texthash" if table == "texthash" else table
        return postfix

    yield make
    for postfix in made:
        postfix.stop()


def _give(username: str, *addresses: str) -> None:
    user = User.objects.create(username=username)
    for address in addresses:
        Address.objects.create(user=user, address=address, source=Address.SOURCE_LOCAL)


def test_postfix_takes_mail_for_mapped_addresses_and_refuses_the_rest(inbound):
    _give("alice", "alice@example.test", "Alice.Smith@Example.test")
    postfix = inbound("hash")
    call_command("writerelaymap")
    postfix.start()

    assert postfix.rcpt("alice@example.test")[0] == 250
    # Postfix lower-cases the address before the lookup; the map holds lower case.
    assert postfix.rcpt("ALICE.SMITH@example.TEST")[0] == 250
    # The map applies to every client, the trusted loopback one included.
    code, text = postfix.rcpt("mallory@example.test")
    assert code == 550 and "User unknown in relay recipient table" in text

    # A new address reaches Postfix with the next write, with no reload: an smtpd whose
    # hash map changed exits after its session, and the next one opens the new map.
    _give("bob", "bob@example.test")
    call_command("writerelaymap")
    assert wait_until(lambda: postfix.rcpt("bob@example.test")[0] == 250, timeout=10)


def test_a_texthash_map_not_written_yet_defers_mail_and_is_used_once_written(inbound):
    """Before the first sync there is no map. Postfix must answer 4xx (the sender tries
    again) rather than take mail for any address of the domain."""
    postfix = inbound("texthash")
    postfix.start()

    code, text = postfix.rcpt("alice@example.test")
    assert 400 <= code < 500, (code, text)

    _give("alice", "alice@example.test")
    call_command("writerelaymap")
    postfix.restart_smtpd()
    # An smtpd still idle from before the reload may take one more connection (and answer
    # from the map as it was) before it sees the reload: the client would try again.
    assert wait_until(lambda: postfix.rcpt("alice@example.test")[0] == 250, timeout=10)
    assert postfix.rcpt("mallory@example.test")[0] == 550
