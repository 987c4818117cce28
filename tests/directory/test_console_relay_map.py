"""Console changes of addresses reach the relay map Postfix reads, once the map is in use:
a user added by vadmin gets mail at once, not after the next sync or a manual
`writerelaymap`. Checked with Debian's real postmap."""

from __future__ import annotations

import io

from django.contrib import messages
from django.contrib.auth.models import User
from django.core.management import call_command
from django.urls import reverse

from tests.directory.conftest import postmap_query

PASSWORD = "a long enough passphrase"


def _keys(path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()]


def _flashes(response) -> list[tuple[int, str]]:
    return [(m.level, m.message) for m in messages.get_messages(response.wsgi_request)]


def test_adding_editing_and_deleting_users_rewrites_the_map(client, world, relay_map):
    call_command("writerelaymap", stdout=io.StringIO())
    client.force_login(world.vadmin)

    client.post(reverse("directory:user_add"), {
        "username": "carol", "password1": PASSWORD, "password2": PASSWORD,
        "addresses": "carol@example.test\n",
    })
    assert "carol@example.test" in _keys(relay_map)
    assert postmap_query("carol@example.test", relay_map).stdout.strip() == "OK"

    carol = User.objects.get(username="carol")
    client.post(reverse("directory:user_edit", args=[carol.id]),
                {"addresses": "carol.new@example.test\n"})
    assert "carol.new@example.test" in _keys(relay_map)
    assert "carol@example.test" not in _keys(relay_map)

    client.post(reverse("directory:user_delete", args=[world.bob.id]))
    assert "bob@example.test" not in _keys(relay_map)
    assert postmap_query("bob@example.test", relay_map).returncode == 1  # not found


def test_without_a_map_in_use_the_console_writes_none(client, world, relay_map):
    client.force_login(world.vadmin)
    client.post(reverse("directory:user_add"), {
        "username": "carol", "password1": PASSWORD, "password2": PASSWORD,
        "addresses": "carol@example.test\n",
    })
    assert not relay_map.exists()


def test_a_map_that_cannot_be_rewritten_is_kept_and_vadmin_is_told(
    client, world, relay_map, settings
):
    call_command("writerelaymap", stdout=io.StringIO())
    before = relay_map.read_bytes()
    settings.RELAY_MAP_POSTMAP_COMMAND = "/nonexistent/postmap"
    client.force_login(world.vadmin)

    response = client.post(reverse("directory:user_add"), {
        "username": "carol", "password1": PASSWORD, "password2": PASSWORD,
        "addresses": "carol@example.test\n",
    })

    assert relay_map.read_bytes() == before
    warnings = [text for level, text in _flashes(response) if level == messages.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("The relay map was not rewritten, Postfix still uses")
    assert "/nonexistent/postmap" in warnings[0]
