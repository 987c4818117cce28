from __future__ import annotations

from pathlib import Path

from django.urls import reverse

from quarantine.models import AuditEvent, Message, Recipient

URL = reverse("directory:clear")


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_clear_quarantine_removes_every_row_and_file(
    client, world, make_message, settings, django_capture_on_commit_callbacks
):
    make_message(recipients=["alice@example.test"])
    make_message(recipients=["bob@example.test", "nobody@example.test"], category="VIRUS")
    assert len(_files(settings.QUARANTINE_DIR)) == 2
    client.force_login(world.vadmin)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(URL, {"confirm": "on"}, follow=True)
    assert response.redirect_chain[-1][0] == reverse("directory:console")
    assert "2 messages deleted" in response.content.decode()
    assert Message.objects.count() == 0
    assert Recipient.objects.count() == 0
    assert _files(settings.QUARANTINE_DIR) == []
    event = AuditEvent.objects.get(action="clear")
    assert event.username == "vadmin"


def test_clear_without_the_confirmation_box_deletes_nothing(client, world, make_message):
    make_message()
    client.force_login(world.vadmin)
    response = client.post(URL, {})
    assert response.status_code == 400
    assert "Tick the box to confirm" in response.content.decode()
    assert Message.objects.count() == 1
    assert not AuditEvent.objects.exists()


def test_clear_by_get_is_not_allowed(client, world, make_message):
    make_message()
    client.force_login(world.vadmin)
    assert client.get(URL, {"confirm": "on"}).status_code == 405
    assert Message.objects.count() == 1


def test_normal_user_cannot_clear_the_quarantine(client, world, make_message):
    make_message()
    client.force_login(world.alice)
    assert client.post(URL, {"confirm": "on"}).status_code == 403
    assert Message.objects.count() == 1
