from __future__ import annotations

from django.contrib.auth.models import User
from django.urls import reverse

from directory.models import Address
from quarantine.models import Message, Recipient


def _url(user) -> str:
    return reverse("directory:user_delete", args=[user.id])


def test_delete_asks_for_confirmation_first(client, world):
    client.force_login(world.vadmin)
    response = client.get(_url(world.alice))
    assert response.status_code == 200
    html = response.content.decode()
    assert "Delete alice</button>" in html
    assert "alice.alias@example.test" in html
    assert User.objects.filter(username="alice").exists()


def test_delete_removes_user_and_addresses_but_keeps_their_mail(client, world, make_message):
    message = make_message(recipients=["alice@example.test"])
    client.force_login(world.vadmin)
    response = client.post(_url(world.alice))
    assert response.status_code == 302
    assert response["Location"] == reverse("directory:users")
    assert not User.objects.filter(username="alice").exists()
    assert not Address.objects.filter(address__startswith="alice").exists()
    assert Message.objects.filter(pk=message.pk).exists()
    assert Recipient.objects.filter(message=message, address="alice@example.test").exists()
    assert User.objects.filter(username="bob").exists()


def test_vadmin_cannot_be_deleted(client, world):
    client.force_login(world.vadmin)
    html = client.get(_url(world.vadmin)).content.decode()
    assert "cannot be deleted" in html
    assert "<form" not in html.split("<main>")[1]
    assert client.post(_url(world.vadmin)).status_code == 403
    assert User.objects.filter(username="vadmin").exists()


def test_deleting_an_unknown_user_is_404(client, world):
    client.force_login(world.vadmin)
    assert client.post(reverse("directory:user_delete", args=[999999])).status_code == 404
