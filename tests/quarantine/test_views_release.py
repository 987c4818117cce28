"""The release button, end to end to a real SMTP server."""

from __future__ import annotations

from django.test import Client
from django.urls import reverse

from quarantine.models import Recipient


def release(message) -> str:
    return reverse("quarantine:release", args=[message.mail_id])


def flash(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def test_owner_releases_and_sees_the_result(client, world, make_message, smtp_sink):
    message = make_message()
    client.force_login(world.alice)

    response = client.post(release(message), {"next": reverse("quarantine:list")}, follow=True)

    assert response.redirect_chain == [(reverse("quarantine:list"), 302)]
    assert flash(response) == ["Released to alice@example.test."]
    assert len(smtp_sink.received) == 1
    assert "by alice" in response.content.decode()


def test_shared_message_release_leaves_the_other_copy(client, world, make_message, smtp_sink):
    message = make_message(recipients=["alice@example.test", "bob@example.test"])
    client.force_login(world.alice)

    client.post(release(message))

    assert smtp_sink.received[0][1] == ["alice@example.test"]
    assert Recipient.objects.get(message=message, address="bob@example.test").released_at is None


def test_outsider_gets_404_on_release(client, world, make_message, smtp_sink):
    message = make_message(recipients=["alice@example.test"])
    client.force_login(world.bob)

    assert client.post(release(message)).status_code == 404
    assert smtp_sink.received == []


def test_anonymous_release_is_sent_to_login(client, world, make_message, smtp_sink):
    message = make_message()
    response = client.post(release(message))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
    assert smtp_sink.received == []


def test_release_by_get_is_refused(client, world, make_message, smtp_sink):
    message = make_message()
    client.force_login(world.alice)

    assert client.get(release(message)).status_code == 405
    assert smtp_sink.received == []


def test_release_without_csrf_token_is_refused(world, make_message, smtp_sink):
    message = make_message()
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.alice)

    assert client.post(release(message)).status_code == 403
    assert smtp_sink.received == []


def test_user_sees_the_servers_refusal(client, world, make_message, smtp_sink):
    smtp_sink.reply = "451 4.3.0 try later"
    message = make_message()
    client.force_login(world.alice)

    response = client.post(release(message), follow=True)

    assert flash(response) == ["Release failed: 451 4.3.0 try later"]
    assert Recipient.objects.get(message=message).released_at is None


def test_user_sees_that_the_server_is_unreachable(client, world, make_message, settings,
                                                  closed_port):
    settings.RELEASE_SMTP_HOST = "127.0.0.1"
    settings.RELEASE_SMTP_PORT = closed_port
    message = make_message()
    client.force_login(world.alice)

    response = client.post(release(message), follow=True)

    assert flash(response) == [
        f"Release failed: cannot connect to 127.0.0.1:{closed_port} (Connection refused)"
    ]


def test_virus_release_by_direct_post_is_refused(client, world, make_message, smtp_sink):
    message = make_message(category="VIRUS")
    client.force_login(world.alice)

    response = client.post(release(message), follow=True)

    assert "administrator" in flash(response)[0]
    assert smtp_sink.received == []


def test_release_from_the_detail_page_returns_there(client, world, make_message, smtp_sink):
    message = make_message()
    client.force_login(world.alice)
    page = reverse("quarantine:detail", args=[message.mail_id])

    response = client.post(release(message), {"next": page})

    assert response["Location"] == page
