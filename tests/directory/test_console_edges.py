"""vadmin's console at the edges of its rules: one owner per address whatever the case or
brackets it is typed in, an address freed by a deleted user, and refusals answered with the
site's own page.

Real requests through the Django test client on real PostgreSQL.
"""

from __future__ import annotations

import re

from django.contrib.auth.models import User
from django.urls import reverse

from directory.models import Address

GOOD_PASSWORD = "a long enough passphrase"


def flash(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def test_an_address_of_another_user_in_other_case_and_brackets_is_refused(client, world):
    client.force_login(world.vadmin)

    response = client.post(reverse("directory:user_add"), {
        "username": "carol",
        "password1": GOOD_PASSWORD,
        "password2": GOOD_PASSWORD,
        "addresses": "carol@example.test\n <BOB@Example.TEST> \n",
    })

    assert response.status_code == 200
    assert "bob@example.test belongs to bob" in response.content.decode()
    assert not User.objects.filter(username="carol").exists()
    assert not Address.objects.filter(address="carol@example.test").exists()


def test_the_same_address_typed_twice_in_two_cases_is_one_address(client, world):
    client.force_login(world.vadmin)

    response = client.post(
        reverse("directory:user_edit", args=[world.alice.id]),
        {"addresses": "Alice@Example.test\nalice@example.TEST\nalice.alias@example.test"},
        follow=True,
    )

    assert flash(response) == ["User alice: no change."]
    assert sorted(world.alice.addresses.values_list("address", flat=True)) == [
        "alice.alias@example.test", "alice@example.test"
    ]


def test_a_deleted_users_address_can_be_given_to_another_user(client, world, make_message):
    """Deleting bob frees his address; given to alice, his held mail is hers to see."""
    message = make_message(recipients=["bob@example.test"])
    client.force_login(world.vadmin)
    deleted = client.post(reverse("directory:user_delete", args=[world.bob.id]), follow=True)
    assert flash(deleted) == ["User bob deleted; their quarantined mail stays."]

    response = client.post(
        reverse("directory:user_edit", args=[world.alice.id]),
        {"addresses": "alice@example.test\nalice.alias@example.test\nbob@example.test"},
        follow=True,
    )

    assert flash(response) == ["User alice: added bob@example.test."]
    client.force_login(world.alice)
    page = client.get(reverse("quarantine:list")).content.decode()
    assert re.findall(r'<tr id="row-([^"]+)"', page) == [message.mail_id]


def test_vadmin_deleting_itself_gets_the_sites_forbidden_page(client, world):
    client.raise_request_exception = False
    client.force_login(world.vadmin)

    response = client.post(reverse("directory:user_delete", args=[world.vadmin.id]))

    assert response.status_code == 403
    page = response.content.decode()
    assert "<h1>Forbidden</h1>" in page
    assert '<link rel="stylesheet"' in page
    assert 'href="/console/"' in page  # the navigation, with the way back to the console
    assert User.objects.filter(id=world.vadmin.id).exists()


def test_with_directory_logins_local_users_keep_their_password_field(client, world,
                                                                     settings):
    """Switching LOGIN_METHOD to ldap hides "Add user", but a local account made before
    still gets its password changed on its page."""
    settings.LOGIN_METHOD = "ldap"
    client.force_login(world.vadmin)

    users = client.get(reverse("directory:users")).content.decode()
    edit = client.get(reverse("directory:user_edit", args=[world.alice.id])).content.decode()

    assert "Add user" not in users
    assert 'name="password1"' in edit
