"""Deleting one message and "Delete all"."""

from __future__ import annotations

from django.test import Client
from django.urls import reverse

from quarantine.models import Message, Recipient
from quarantine.store import get_store

DELETE_ALL = reverse("quarantine:delete-all")


def delete(message) -> str:
    return reverse("quarantine:delete", args=[message.mail_id])


def test_owner_deletes_a_message_and_its_file(client, world, make_message,
                                               django_capture_on_commit_callbacks):
    message = make_message()
    client.force_login(world.alice)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(delete(message), {"next": reverse("quarantine:list")})

    assert response.status_code == 302
    assert response["Location"] == reverse("quarantine:list")
    assert not Message.objects.filter(id=message.id).exists()
    assert not get_store(message.origin).exists(message.storage_key)


def test_shared_message_is_deleted_for_the_user_only(client, world, make_message):
    message = make_message(recipients=["alice@example.test", "bob@example.test"])
    client.force_login(world.alice)

    client.post(delete(message))

    assert list(Recipient.objects.filter(message=message).values_list("address", flat=True)) == [
        "bob@example.test"
    ]


def test_outsider_gets_404_on_delete(client, world, make_message):
    message = make_message(recipients=["alice@example.test"])
    client.force_login(world.bob)

    assert client.post(delete(message)).status_code == 404
    assert Recipient.objects.filter(message=message).exists()


def test_anonymous_delete_is_sent_to_login(client, world, make_message):
    message = make_message()
    response = client.post(delete(message))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
    assert Message.objects.filter(id=message.id).exists()


def test_delete_by_get_is_refused(client, world, make_message):
    message = make_message()
    client.force_login(world.alice)

    assert client.get(delete(message)).status_code == 405
    # A GET of "Delete all" only asks for the confirmation.
    assert client.get(DELETE_ALL, {"confirm": "yes", "count": "1"}).status_code == 200
    assert Message.objects.filter(id=message.id).exists()


def test_delete_without_csrf_token_is_refused(world, make_message):
    message = make_message()
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.alice)

    assert client.post(delete(message)).status_code == 403
    assert client.post(DELETE_ALL).status_code == 403
    assert Message.objects.filter(id=message.id).exists()


def test_redirect_after_delete_never_leaves_the_site(client, world, make_message):
    client.force_login(world.alice)
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example"):
        message = make_message()
        response = client.post(delete(message), {"next": target})
        assert response["Location"] == reverse("quarantine:list")


def test_delete_all_removes_the_users_mail_only(client, world, make_message):
    make_message(recipients=["alice@example.test"])
    make_message(recipients=["alice.alias@example.test"])
    shared = make_message(recipients=["alice@example.test", "bob@example.test"])
    bobs = make_message(recipients=["bob@example.test"])
    client.force_login(world.alice)

    response = client.post(DELETE_ALL, {"confirm": "yes", "count": "3"}, follow=True)

    # Her three messages leave her quarantine; the shared one stays in bob's.
    assert "3 messages deleted." in response.content.decode()
    assert sorted(Recipient.objects.values_list("address", flat=True)) == [
        "bob@example.test", "bob@example.test"
    ]
    assert {m.id for m in Message.objects.all()} == {shared.id, bobs.id}


def test_user_parameter_does_not_let_a_user_delete_another_users_mail(
    client, world, make_message
):
    bobs = make_message(recipients=["bob@example.test"])
    client.force_login(world.alice)

    client.post(DELETE_ALL, {"user": world.bob.id, "confirm": "yes", "count": "1"})

    assert Message.objects.filter(id=bobs.id).exists()


def test_vadmin_deletes_all_of_one_users_mail(client, world, make_message):
    make_message(recipients=["alice@example.test"])
    bobs = make_message(recipients=["bob@example.test"])
    client.force_login(world.vadmin)

    response = client.post(DELETE_ALL, {"user": world.alice.id, "confirm": "yes", "count": "1"})

    assert response["Location"] == f"{reverse('quarantine:list')}?user={world.alice.id}"
    assert [m.id for m in Message.objects.all()] == [bobs.id]
