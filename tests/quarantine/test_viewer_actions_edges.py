"""What the list's and the message page's actions do, as their users expect it: "Delete all"
asks first and says how many messages go; vadmin's row actions on one user's list act on
that user's copies; a message sent to several addresses of a user is one row; the way back
to the list keeps its filter and page; a link's target is shown as text; times say their
zone.

Pages are requested with the Django test client on real PostgreSQL; messages are real
store files indexed by the real indexer (tests/conftest.py `make_message`); releases go to
a real SMTP server on loopback (`smtp_sink`).
"""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest
from django.test import Client
from django.urls import reverse

from quarantine.forms import encode_cursor
from quarantine.models import AuditEvent, Message, PendingFileDeletion, Recipient
from quarantine.store import get_store
from tests.quarantine.test_viewer_functional_edges import shown_body

LIST = reverse("quarantine:list")
DELETE_ALL = reverse("quarantine:delete-all")


def detail(message) -> str:
    return reverse("quarantine:detail", args=[message.mail_id])


def mail_ids(response) -> list[str]:
    return re.findall(r'<tr id="row-([^"]+)"', response.content.decode())


def flash(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def confirm_form(response) -> dict[str, str]:
    """What the confirmation page's POST form to delete-all sends: its hidden fields and
    its submit button's name and value."""
    page = response.content.decode()
    match = re.search(
        rf'<form method="post" action="{re.escape(DELETE_ALL)}"[^>]*>(.*?)</form>', page, re.S
    )
    assert match, "the page has no form that confirms the deletion"
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"',
                             match.group(1)))
    fields.update(re.findall(r'<button type="submit"[^>]* name="([^"]+)" value="([^"]*)"',
                             match.group(1)))
    return {name: html.unescape(value) for name, value in fields.items()}


def addresses_left(message) -> list[str]:
    return sorted(Recipient.objects.filter(message=message).values_list("address", flat=True))


# --- "Delete all" asks first --------------------------------------------------------------


def test_delete_all_on_the_list_leads_to_a_confirmation_page_first(client, world,
                                                                    make_message):
    make_message(recipients=["alice@example.test"])
    make_message(recipients=["alice@example.test", "alice.alias@example.test"])
    make_message(recipients=["alice.alias@example.test", "bob@example.test"])
    make_message(recipients=["bob@example.test"])
    client.force_login(world.alice)

    page = client.get(LIST).content.decode()
    assert f'<a class="button danger" href="{DELETE_ALL}" id="delete-all">Delete all</a>' in page
    response = client.get(DELETE_ALL)

    assert response.status_code == 200
    text = response.content.decode()
    # Three messages of hers, whatever number of her addresses each was sent to.
    assert "Delete 3 messages from your quarantine?" in text
    assert "csrfmiddlewaretoken" in confirm_form(response)
    assert "<script" not in text
    assert "script-src" not in response["Content-Security-Policy"]
    assert Recipient.objects.count() == 6


def test_delete_all_without_the_confirmation_deletes_nothing(client, world, make_message):
    message = make_message(recipients=["alice@example.test"])
    client.force_login(world.alice)

    response = client.post(DELETE_ALL)

    assert response.status_code == 302
    assert response["Location"] == DELETE_ALL
    assert Message.objects.filter(id=message.id).exists()


def test_confirmed_delete_all_deletes_the_users_messages_and_says_how_many(
    client, world, make_message, django_capture_on_commit_callbacks
):
    make_message(recipients=["alice@example.test"])
    make_message(recipients=["alice@example.test", "alice.alias@example.test"])
    shared = make_message(recipients=["alice.alias@example.test", "bob@example.test"])
    client.force_login(world.alice)
    fields = confirm_form(client.get(DELETE_ALL))

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(DELETE_ALL, fields, follow=True)

    assert response.redirect_chain == [(LIST, 302)]
    assert flash(response) == ["3 messages deleted."]
    assert addresses_left(shared) == ["bob@example.test"]
    assert Message.objects.count() == 1


def test_delete_all_keeps_mail_that_arrived_after_the_confirmation_page(
    client, world, make_message
):
    """The user confirmed deleting what the page counted: a message quarantined after it
    was shown is not deleted unseen."""
    make_message(recipients=["alice@example.test"], subject="Shown")
    client.force_login(world.alice)
    fields = confirm_form(client.get(DELETE_ALL))
    arrived = make_message(recipients=["alice@example.test"], subject="Arrived meanwhile")

    response = client.post(DELETE_ALL, fields, follow=True)

    assert "1 message deleted." in response.content.decode()
    assert list(Message.objects.values_list("id", flat=True)) == [arrived.id]


def test_delete_all_asks_again_when_mail_went_after_the_confirmation_page(
    client, world, make_message
):
    from quarantine.deletion import delete_message

    make_message(recipients=["alice@example.test"])
    gone = make_message(recipients=["alice@example.test"])
    client.force_login(world.alice)
    fields = confirm_form(client.get(DELETE_ALL))
    delete_message(gone, user=world.alice)

    response = client.post(DELETE_ALL, fields)

    assert response.status_code == 200
    assert "Delete 1 message from your quarantine?" in response.content.decode()
    assert confirm_form(response)["count"] == "1"
    assert Message.objects.count() == 1


def test_delete_all_with_nothing_to_delete_offers_no_button(client, world, make_message):
    make_message(recipients=["bob@example.test"])
    client.force_login(world.alice)

    response = client.get(DELETE_ALL)

    assert "There are no messages to delete." in response.content.decode()
    assert 'name="confirm"' not in response.content.decode()


def test_vadmin_confirms_deleting_all_of_one_users_mail(client, world, make_message):
    make_message(recipients=["alice@example.test"])
    make_message(recipients=["alice@example.test", "alice.alias@example.test"])
    shared = make_message(recipients=["alice@example.test", "bob@example.test"])
    client.force_login(world.vadmin)

    page = client.get(LIST, {"user": world.alice.id}).content.decode()
    assert f'href="{DELETE_ALL}?user={world.alice.id}"' in page
    confirm = client.get(DELETE_ALL, {"user": world.alice.id})
    assert "Delete 3 messages from the quarantine of alice?" in confirm.content.decode()
    assert Message.objects.count() == 3

    response = client.post(DELETE_ALL, confirm_form(confirm), follow=True)

    assert response.redirect_chain == [(f"{LIST}?user={world.alice.id}", 302)]
    assert flash(response) == ["Deleted alice's copies of 3 messages."]
    assert addresses_left(shared) == ["bob@example.test"]


def test_a_user_cannot_confirm_deleting_another_users_mail(client, world, make_message):
    bobs = make_message(recipients=["bob@example.test"])
    make_message(recipients=["alice@example.test"])
    client.force_login(world.alice)

    confirm = client.get(DELETE_ALL, {"user": world.bob.id})
    assert "Delete 1 message from your quarantine?" in confirm.content.decode()
    assert "user" not in confirm_form(confirm)
    client.post(DELETE_ALL, {"user": world.bob.id, "confirm": "yes", "count": "1"})

    assert Message.objects.filter(id=bobs.id).exists()
    assert Message.objects.count() == 1


def test_the_confirmed_delete_all_still_needs_the_csrf_token(world, make_message):
    make_message(recipients=["alice@example.test"])
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.alice)

    response = client.post(DELETE_ALL, {"confirm": "yes", "count": "1"})

    assert response.status_code == 403
    assert Message.objects.count() == 1


# --- vadmin's row actions on one user's list ----------------------------------------------


def test_rows_of_one_users_list_carry_that_user_to_their_actions(client, world, make_message):
    message = make_message(recipients=["alice@example.test", "bob@example.test"])
    client.force_login(world.vadmin)

    page = client.get(LIST, {"user": world.alice.id}).content.decode()
    row = re.search(rf'<tr id="row-{message.mail_id}">(.*?)</tr>', page, re.S).group(1)

    assert row.count(f'<input type="hidden" name="user" value="{world.alice.id}">') == 2


def test_vadmin_deleting_a_row_of_one_users_list_deletes_that_users_copy_only(
    client, world, make_message
):
    message = make_message(recipients=["alice@example.test", "bob@example.test"])
    client.force_login(world.vadmin)
    here = f"{LIST}?user={world.alice.id}"

    response = client.post(reverse("quarantine:delete", args=[message.mail_id]),
                           {"next": here, "user": world.alice.id}, follow=True)

    assert response.redirect_chain == [(here, 302)]
    assert addresses_left(message) == ["bob@example.test"]
    assert flash(response) == [
        "Deleted alice's copy (alice@example.test); the other recipients keep theirs."
    ]
    event = AuditEvent.objects.get(action=AuditEvent.Action.DELETE)
    assert (event.username, event.mail_id) == ("vadmin", message.mail_id)
    assert "alice@example.test" in event.detail


def test_vadmin_deleting_the_last_copy_on_a_users_list_removes_the_message_and_its_file(
    client, world, make_message, django_capture_on_commit_callbacks
):
    message = make_message(recipients=["alice@example.test", "alice.alias@example.test"])
    client.force_login(world.vadmin)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("quarantine:delete", args=[message.mail_id]),
                               {"user": world.alice.id}, follow=True)

    assert flash(response) == [
        "Deleted alice's copies (alice.alias@example.test, alice@example.test); "
        "no recipient is left."
    ]
    assert not Message.objects.filter(id=message.id).exists()
    assert not get_store(message.origin).exists(message.storage_key)
    assert not PendingFileDeletion.objects.exists()


def test_vadmin_releasing_a_row_of_one_users_list_releases_that_users_copy_only(
    client, world, make_message, smtp_sink
):
    message = make_message(recipients=["alice@example.test", "bob@example.test"])
    client.force_login(world.vadmin)

    response = client.post(reverse("quarantine:release", args=[message.mail_id]),
                           {"user": world.alice.id}, follow=True)

    assert [rcpts for _, rcpts, _ in smtp_sink.received] == [["alice@example.test"]]
    assert Recipient.objects.get(message=message, address="bob@example.test").released_at is None
    assert flash(response) == ["Released alice's copy to alice@example.test."]


def test_vadmin_acting_for_a_user_without_a_copy_changes_nothing(client, world, make_message,
                                                                 smtp_sink):
    message = make_message(recipients=["bob@example.test"])
    client.force_login(world.vadmin)

    deleted = client.post(reverse("quarantine:delete", args=[message.mail_id]),
                          {"user": world.alice.id}, follow=True)
    released = client.post(reverse("quarantine:release", args=[message.mail_id]),
                           {"user": world.alice.id}, follow=True)

    assert flash(deleted) == ["Nothing deleted: alice has no copy of this message."]
    assert "alice" in flash(released)[0] and not flash(released)[0].startswith("Released")
    assert addresses_left(message) == ["bob@example.test"]
    assert smtp_sink.received == []


def test_vadmins_unfiltered_row_actions_act_on_the_whole_message(client, world, make_message,
                                                                 smtp_sink):
    released = make_message(recipients=["alice@example.test", "bob@example.test"])
    deleted = make_message(recipients=["alice@example.test", "bob@example.test"])
    client.force_login(world.vadmin)

    release = client.post(reverse("quarantine:release", args=[released.mail_id]), follow=True)
    delete = client.post(reverse("quarantine:delete", args=[deleted.mail_id]), follow=True)

    assert sorted(smtp_sink.received[0][1]) == ["alice@example.test", "bob@example.test"]
    assert flash(release) == ["Released to alice@example.test, bob@example.test."]
    assert flash(delete) == ["Message deleted for every recipient."]
    assert not Message.objects.filter(id=deleted.id).exists()


def test_a_user_parameter_never_lets_a_user_act_on_another_users_copy(
    client, world, make_message, smtp_sink
):
    shared = make_message(recipients=["alice@example.test", "bob@example.test"])
    bobs = make_message(recipients=["bob@example.test"])
    client.force_login(world.alice)

    client.post(reverse("quarantine:release", args=[shared.mail_id]), {"user": world.bob.id})
    client.post(reverse("quarantine:delete", args=[shared.mail_id]), {"user": world.bob.id})
    refused = client.post(reverse("quarantine:delete", args=[bobs.mail_id]),
                          {"user": world.bob.id})

    assert [rcpts for _, rcpts, _ in smtp_sink.received] == [["alice@example.test"]]
    assert addresses_left(shared) == ["bob@example.test"]
    assert refused.status_code == 404
    assert addresses_left(bobs) == ["bob@example.test"]


# --- One row per message ------------------------------------------------------------------


def test_a_message_to_two_of_the_users_addresses_is_one_row_naming_both(client, world,
                                                                        make_message):
    message = make_message(recipients=["alice@example.test", "alice.alias@example.test",
                                       "bob@example.test"])
    client.force_login(world.alice)

    response = client.get(LIST)
    row = re.search(r'<td data-label="Recipient">(.*?)</td>', response.content.decode(),
                    re.S).group(1)

    assert mail_ids(response) == [message.mail_id]
    assert "alice@example.test" in row and "alice.alias@example.test" in row
    assert "bob@example.test" not in row


def test_vadmins_whole_list_shows_a_shared_message_once_with_every_recipient(
    client, world, make_message
):
    message = make_message(recipients=["alice@example.test", "bob@example.test"])
    client.force_login(world.vadmin)

    whole = client.get(LIST)
    alices = client.get(LIST, {"user": world.alice.id})

    assert mail_ids(whole) == [message.mail_id]
    assert "bob@example.test" in whole.content.decode()
    assert mail_ids(alices) == [message.mail_id]
    assert "bob@example.test" not in alices.content.decode()


def test_pages_of_messages_to_several_addresses_hold_each_message_once(
    client, world, make_message, settings
):
    settings.QUARANTINE_PAGE_SIZE = 5
    same_time = datetime(2026, 3, 1, tzinfo=UTC)
    made = [make_message(recipients=["alice@example.test", "alice.alias@example.test"],
                         received_at=same_time) for _ in range(6)]
    made += [make_message(recipients=["alice.alias@example.test"]) for _ in range(3)]
    client.force_login(world.alice)

    seen: list[str] = []
    pages = []
    response = client.get(LIST)
    while True:
        pages.append(mail_ids(response))
        seen += pages[-1]
        match = re.search(r'<a href="\?([^"]+)" id="older">', response.content.decode())
        if not match:
            break
        response = client.get(LIST + "?" + html.unescape(match.group(1)))

    assert [len(p) for p in pages] == [5, 4]
    assert sorted(seen) == sorted(m.mail_id for m in made)


def test_searching_for_the_second_address_finds_the_message_once(client, world, make_message):
    message = make_message(recipients=["alice@example.test", "alice.alias@example.test"])
    make_message(recipients=["alice@example.test"])
    client.force_login(world.alice)

    assert mail_ids(client.get(LIST, {"q": "alias@"})) == [message.mail_id]
    assert len(mail_ids(client.get(LIST, {"q": "example.test"}))) == 2


def test_release_and_delete_of_the_row_act_on_each_of_the_users_addresses(
    client, world, make_message, smtp_sink
):
    message = make_message(recipients=["alice@example.test", "alice.alias@example.test",
                                       "bob@example.test"])
    client.force_login(world.alice)

    client.post(reverse("quarantine:release", args=[message.mail_id]))
    page = client.get(LIST).content.decode()
    client.post(reverse("quarantine:delete", args=[message.mail_id]))

    assert sorted(smtp_sink.received[0][1]) == ["alice.alias@example.test",
                                                "alice@example.test"]
    assert reverse("quarantine:release", args=[message.mail_id]) not in page
    assert page.count("by alice") == 2
    assert addresses_left(message) == ["bob@example.test"]


# --- The way back to the list -------------------------------------------------------------


def back_link(response) -> str:
    match = re.search(r'<a href="([^"]*)" id="back">Back to the list</a>',
                      response.content.decode())
    assert match, "the page has no way back to the list"
    return html.unescape(match.group(1))


def test_the_message_page_leads_back_to_the_same_filter_search_and_page(
    client, world, make_message, settings
):
    settings.QUARANTINE_PAGE_SIZE = 5
    made = [make_message(subject=f"Offer {n}") for n in range(7)]
    client.force_login(world.alice)
    first = client.get(LIST, {"q": "Offer", "category": "SPAM"}).content.decode()
    older = html.unescape(re.search(r'<a href="\?([^"]+)" id="older">', first).group(1))
    listing = client.get(f"{LIST}?{older}")
    link = re.search(r'href="([^"]*)">Offer 1</a>', listing.content.decode()).group(1)

    response = client.get(html.unescape(link))

    back = back_link(response)
    assert urlsplit(back).path == LIST
    assert parse_qs(urlsplit(back).query) == parse_qs(older)
    assert mail_ids(client.get(back)) == [made[1].mail_id, made[0].mail_id]


def test_the_way_back_carries_only_known_and_valid_parameters(client, world, make_message):
    message = make_message()
    client.force_login(world.alice)
    cursor = encode_cursor(datetime(2026, 1, 1, tzinfo=UTC), 7)

    response = client.get(detail(message), {
        "q": '"><script>x</script>', "category": "SPAM", "cursor": cursor,
        "next": "https://evil.example/", "user": world.bob.id, "category2": "x",
    })

    back = back_link(response)
    assert back.startswith(LIST + "?")
    assert parse_qs(urlsplit(back).query) == {
        "q": ['"><script>x</script>'], "category": ["SPAM"], "cursor": [cursor],
    }
    assert "<script>x" not in response.content.decode()


@pytest.mark.parametrize("params", [
    {"category": "NOPE"}, {"cursor": "garbage"}, {"q": "a" * 500}, {"next": "//evil.example"},
])
def test_invalid_parameters_are_left_out_of_the_way_back(client, world, make_message, params):
    message = make_message()
    client.force_login(world.alice)

    assert back_link(client.get(detail(message), params)) == LIST


def test_vadmins_way_back_keeps_the_users_list_and_the_actions_stay_on_that_user(
    client, world, make_message
):
    message = make_message(recipients=["alice@example.test", "bob@example.test"])
    client.force_login(world.vadmin)
    listing = client.get(LIST, {"user": world.alice.id, "category": "SPAM"}).content.decode()
    link = html.unescape(re.search(r'href="([^"]*)">Hello</a>', listing).group(1))

    response = client.get(link)
    page = response.content.decode()

    assert parse_qs(urlsplit(back_link(response)).query) == {
        "user": [str(world.alice.id)], "category": ["SPAM"],
    }
    assert page.count(f'<input type="hidden" name="user" value="{world.alice.id}">') == 2
    client.post(reverse("quarantine:delete", args=[message.mail_id]),
                {"user": world.alice.id})
    assert addresses_left(message) == ["bob@example.test"]


def test_deleting_on_the_message_page_returns_to_the_filtered_list(client, world,
                                                                   make_message):
    message = make_message()
    client.force_login(world.alice)
    page = client.get(detail(message), {"category": "SPAM", "q": "Hello"}).content.decode()
    form = re.search(r'action="[^"]*/delete".*?name="next" value="([^"]*)"', page, re.S)

    response = client.post(reverse("quarantine:delete", args=[message.mail_id]),
                           {"next": html.unescape(form.group(1))})

    assert urlsplit(response["Location"]).path == LIST
    assert parse_qs(urlsplit(response["Location"]).query) == {
        "category": ["SPAM"], "q": ["Hello"],
    }


# --- Where a link leads -------------------------------------------------------------------


def test_the_message_page_shows_where_a_link_leads_as_text(client, world, make_message):
    message = make_message(
        body=None,
        html='<p>Your account is locked. <a href="https://evil.example/x?a=1&amp;b=2">'
             "Click here</a> to unlock it.</p>",
    )
    client.force_login(world.alice)

    response = client.get(detail(message))

    assert "Click here <https://evil.example/x?a=1&b=2> to unlock it." in shown_body(response)
    assert "Click here &lt;https://evil.example/x?a=1&amp;b=2&gt;" in response.content.decode()
    assert 'href="https://evil.example' not in response.content.decode()


# --- Times say their zone -----------------------------------------------------------------


def test_times_on_the_list_and_the_message_page_name_their_zone(client, world, make_message,
                                                                settings):
    settings.TIME_ZONE = "Europe/Berlin"
    message = make_message(received_at=datetime(2026, 11, 20, 10, 0, tzinfo=UTC))
    Recipient.objects.filter(message=message).update(
        released_at=datetime(2026, 11, 20, 12, 30, tzinfo=UTC), released_by=world.alice
    )
    client.force_login(world.alice)

    listing = client.get(LIST).content.decode()
    page = client.get(detail(message)).content.decode()

    assert '<td data-label="Date">2026-11-20 11:00 CET</td>' in listing
    assert "2026-11-20 13:30 CET by alice" in listing
    assert "<dt>Received</dt><dd>2026-11-20 11:00:00 CET</dd>" in page
    assert "released 2026-11-20 13:30 CET by alice" in page


def test_times_in_utc_say_so(client, world, make_message, settings):
    settings.TIME_ZONE = "UTC"
    make_message(received_at=datetime(2026, 7, 1, 8, 5, tzinfo=UTC))
    client.force_login(world.alice)

    assert '<td data-label="Date">2026-07-01 08:05 UTC</td>' in client.get(LIST).content.decode()
