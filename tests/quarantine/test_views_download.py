"""Downloading the original message."""

from __future__ import annotations

from django.urls import reverse

from quarantine.models import AuditEvent

RAW = (b"From: Sender <sender@remote.example>\nTo: alice@example.test\n"
       b"Subject: x\nContent-Type: text/html\n\n<script>alert(1)</script>\n")


def download(message) -> str:
    return reverse("quarantine:download", args=[message.mail_id])


def test_owner_downloads_the_original_as_an_inert_attachment(client, world, make_message):
    message = make_message(raw=RAW, category="SPAM")
    client.force_login(world.alice)

    response = client.get(download(message))

    assert response.status_code == 200
    assert response.content == RAW
    assert response["Content-Type"] == "message/rfc822"
    assert response["Content-Disposition"] == f'attachment; filename="{message.mail_id}.eml"'
    assert response["X-Content-Type-Options"] == "nosniff"
    assert AuditEvent.objects.filter(action="download", mail_id=message.mail_id,
                                     username="alice").count() == 1


def test_quarantine_header_block_is_not_in_the_download(client, world, make_message):
    message = make_message(raw=RAW)
    client.force_login(world.alice)

    content = client.get(download(message)).content

    assert b"X-Envelope-From" not in content and b"X-Quarantine-ID" not in content


def test_outsider_gets_404_on_download(client, world, make_message):
    message = make_message(recipients=["alice@example.test"])
    client.force_login(world.bob)

    assert client.get(download(message)).status_code == 404
    assert not AuditEvent.objects.filter(action="download").exists()


def test_anonymous_download_is_sent_to_login(client, world, make_message):
    message = make_message()
    response = client.get(download(message))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_virus_download_is_forbidden_even_by_url_guessing(client, world, make_message):
    message = make_message(category="VIRUS")
    for user in (world.alice, world.vadmin):
        client.force_login(user)
        assert client.get(download(message)).status_code == 403
        assert client.get(download(message), {"format": "raw"}).status_code == 403


def test_allowed_types_come_from_the_setting(client, world, make_message, settings):
    settings.ALLOWED_DOWNLOAD_TYPES = ["BANNED"]
    spam = make_message(category="SPAM")
    banned = make_message(category="BANNED")
    client.force_login(world.alice)

    assert client.get(download(spam)).status_code == 403
    assert client.get(download(banned)).status_code == 200
    page = client.get(reverse("quarantine:list")).content.decode()
    assert download(banned) in page and download(spam) not in page


def test_download_is_get_only(client, world, make_message):
    message = make_message()
    client.force_login(world.alice)
    assert client.post(download(message)).status_code == 405
