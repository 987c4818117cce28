from __future__ import annotations

from django.contrib.auth.models import User
from django.urls import reverse

URL = reverse("directory:users")


def test_users_page_lists_users_with_address_and_message_counts(client, world, make_message):
    make_message(recipients=["alice@example.test"])
    make_message(recipients=["alice.alias@example.test", "bob@example.test"])
    client.force_login(world.vadmin)
    response = client.get(URL)
    assert response.status_code == 200
    rows = {u.username: (u.address_count, u.message_count) for u in response.context["users"]}
    assert rows == {"alice": (2, 2), "bob": (1, 1), "vadmin": (0, 0)}
    html = response.content.decode()
    assert '<td data-label="Messages">2</td>' in html


def test_users_page_links_to_edit_messages_and_delete(client, world):
    client.force_login(world.vadmin)
    html = client.get(URL).content.decode()
    alice = world.alice.id
    assert f'href="{reverse("directory:user_edit", args=[alice])}">alice</a>' in html
    assert f'href="{reverse("quarantine:list")}?user={alice}">Messages</a>' in html
    assert f'href="{reverse("directory:user_delete", args=[alice])}">Delete</a>' in html


def test_vadmin_has_no_delete_link(client, world):
    client.force_login(world.vadmin)
    html = client.get(URL).content.decode()
    assert reverse("directory:user_delete", args=[world.vadmin.id]) not in html


def test_the_users_page_is_a_constant_number_of_queries(
    client, world, make_message, django_assert_max_num_queries
):
    for n in range(20):
        User.objects.create_user(f"user{n}")
    make_message(recipients=["alice@example.test"])
    client.force_login(world.vadmin)
    # Session, user, the one list query, plus room for middleware; not one per user.
    with django_assert_max_num_queries(6):
        assert client.get(URL).status_code == 200
