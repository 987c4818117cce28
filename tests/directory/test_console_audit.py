from __future__ import annotations

from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from directory import views
from quarantine.models import AuditEvent, record_event

URL = reverse("directory:audit")


def test_audit_log_lists_events_newest_first(client, world):
    record_event(world.alice, "release", mail_id="first-id", detail="to alice@example.test")
    record_event(world.bob, "download", mail_id="second-id")
    client.force_login(world.vadmin)
    response = client.get(URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert html.index("second-id") < html.index("first-id")
    assert "to alice@example.test" in html
    assert '<td data-label="Who">alice</td>' in html


def test_audit_log_filters_by_action(client, world):
    record_event(world.alice, "release", mail_id="released-id")
    record_event(world.alice, "delete", mail_id="deleted-id")
    client.force_login(world.vadmin)
    html = client.get(URL, {"action": "delete"}).content.decode()
    assert "deleted-id" in html
    assert "released-id" not in html


def test_an_unknown_action_filter_shows_everything_without_error(client, world):
    record_event(world.alice, "release", mail_id="released-id")
    client.force_login(world.vadmin)
    response = client.get(URL, {"action": "nope'--", "before": "x"})
    assert response.status_code == 200
    assert "released-id" in response.content.decode()


def test_audit_log_pages_by_id_cursor_without_counting(client, world, monkeypatch):
    monkeypatch.setattr(views, "AUDIT_PAGE_SIZE", 3)
    ids = [record_event(world.alice, "download", mail_id=f"m{n:02d}").id for n in range(7)]
    client.force_login(world.vadmin)
    response = client.get(URL)
    assert [e.mail_id for e in response.context["events"]] == ["m06", "m05", "m04"]
    assert response.context["older"] == ids[4]
    assert f"before={ids[4]}" in response.content.decode()
    response = client.get(URL, {"before": ids[4]})
    assert [e.mail_id for e in response.context["events"]] == ["m03", "m02", "m01"]
    response = client.get(URL, {"before": ids[1]})
    assert [e.mail_id for e in response.context["events"]] == ["m00"]
    assert response.context["older"] is None
    with CaptureQueriesContext(connection) as queries:
        client.get(URL)
    assert not any("COUNT(" in q["sql"].upper() for q in queries.captured_queries)


def test_markup_in_audit_fields_is_shown_as_text(client, world):
    AuditEvent.objects.create(username="<b>who</b>", action="delete",
                              mail_id="<i>id</i>", detail="<script>alert(1)</script>")
    client.force_login(world.vadmin)
    html = client.get(URL).content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>" not in html
    assert "&lt;b&gt;who&lt;/b&gt;" in html
    assert "<i>id</i>" not in html
