"""A person's whole path through the quarantine, in Chromium, against the real pages.

Alice logs in, looks, searches, filters, reads, downloads, releases to a real SMTP server
on loopback, deletes, and logs out. The site's Content-Security-Policy is enforced here,
and no page may break it: a template that needed inline style or script would show up as a
violation.
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
from aiosmtpd.controller import Controller

from quarantine.models import Message
from quarantine.store import get_store
from tests.e2e.conftest import Watch, login, page_text

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

NOW = datetime.now(UTC).replace(microsecond=0)


def _assert_policy_kept(watch: Watch) -> None:
    watch.assert_contained()
    assert watch.csp_violations == []


class _Recorder:
    """An aiosmtpd handler that accepts every message and keeps its envelope and bytes."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook
        self.received.append(
            (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        return "250 2.0.0 Ok: queued"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def next_hop(settings):
    """A real SMTP server on an ephemeral loopback port, where releases are sent."""
    recorder = _Recorder()
    controller = Controller(recorder, hostname="127.0.0.1", port=_free_port())
    controller.start()
    settings.RELEASE_SMTP_HOST = "127.0.0.1"
    settings.RELEASE_SMTP_PORT = controller.port
    yield recorder
    controller.stop()


@pytest.fixture
def mailbox(world, make_message):
    """Alice's quarantine, oldest first, and one message of bob's she must never see."""

    def at(minutes_ago: int) -> datetime:
        return NOW - timedelta(minutes=minutes_ago)

    made = {
        "oldest": make_message(category="SPAM", subject="Cheap watches for you",
                               received_at=at(50), body="Watches at half price.\n"),
        "virus": make_message(category="VIRUS", subject="Your invoice attached",
                              received_at=at(40), reasons="Eicar-Signature"),
        "banned": make_message(category="BANNED", subject="Holiday photos",
                               recipients=["alice.alias@example.test"], received_at=at(30)),
        "spam": make_message(category="SPAM", subject="Quarterly figures for the board",
                             sender="figures@remote.example", received_at=at(20),
                             body="The quarterly figures are in the attached sheet.\n"),
        "newest": make_message(category="BADH", subject="Minutes of the meeting",
                               received_at=at(10), body="Minutes are below.\n"),
        "bob": make_message(category="SPAM", subject="Bob's private offer",
                            recipients=["bob@example.test"], received_at=at(5)),
    }
    return made


def _subjects(page) -> list[str]:
    return [s.strip() for s in page.locator("a.subject").all_inner_texts()]


def _open(page, message: Message) -> None:
    with page.expect_navigation():
        page.locator("a.subject", has_text=message.subject).click()


def test_alice_sees_her_messages_newest_first(page, watch, live_server, mailbox):
    login(page, live_server, "alice")

    assert urlsplit(page.url).path == "/"
    assert _subjects(page) == [
        "Minutes of the meeting",
        "Quarterly figures for the board",
        "Holiday photos",
        "Your invoice attached",
        "Cheap watches for you",
    ]
    assert "Bob's private offer" not in page_text(page)
    stylesheets = {url: status for url, status in watch.responses if url.endswith(".css")}
    assert list(stylesheets.values()) == [200], f"the stylesheet did not load: {stylesheets}"
    _assert_policy_kept(watch)


def test_alice_finds_a_message_by_searching_its_subject(page, watch, live_server, mailbox):
    login(page, live_server, "alice")

    page.fill('input[name="q"]', "quarterly")
    with page.expect_navigation():
        page.press('input[name="q"]', "Enter")

    assert _subjects(page) == ["Quarterly figures for the board"]
    assert page.input_value('input[name="q"]') == "quarterly"
    _assert_policy_kept(watch)


def test_alice_filters_her_messages_by_category(page, watch, live_server, mailbox):
    login(page, live_server, "alice")

    page.select_option('select[name="category"]', "VIRUS")
    form = page.locator('form:has(select[name="category"])')
    with page.expect_navigation():
        form.locator("button").first.click()

    assert _subjects(page) == ["Your invoice attached"]
    _assert_policy_kept(watch)


def test_alice_reads_a_message_on_its_page(page, watch, live_server, mailbox):
    message = mailbox["spam"]
    login(page, live_server, "alice")

    _open(page, message)

    assert urlsplit(page.url).path == f"/message/{message.mail_id}/"
    text = page_text(page)
    assert "Quarterly figures for the board" in text
    assert "The quarterly figures are in the attached sheet." in text
    _assert_policy_kept(watch)


def test_alice_downloads_a_spam_message_as_the_original_file(page, watch, live_server,
                                                             mailbox):
    message = mailbox["spam"]
    original = get_store(message.origin).load(message.storage_key).message
    login(page, live_server, "alice")
    _open(page, message)

    with page.expect_response(lambda r: r.url.endswith("/download")) as response_info:
        with page.expect_download() as download_info:
            page.get_by_role("link", name="Download").click()

    response = response_info.value
    download = download_info.value
    assert urlsplit(response.url).path == f"/message/{message.mail_id}/download"
    assert response.headers["content-type"].split(";")[0] == "message/rfc822"
    assert response.headers["content-disposition"].startswith("attachment")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert download.suggested_filename.endswith(".eml")
    with open(download.path(), "rb") as fh:
        assert fh.read().replace(b"\r\n", b"\n") == original
    _assert_policy_kept(watch)


def test_a_virus_message_offers_no_download(page, watch, live_server, mailbox):
    message = mailbox["virus"]
    login(page, live_server, "alice")
    _open(page, message)

    assert page.get_by_role("link", name="Download").count() == 0
    response = page.goto(f"{live_server.url}/message/{message.mail_id}/download")
    assert response.status == 403
    _assert_policy_kept(watch)


def test_alice_releases_a_message_to_the_next_hop(page, watch, live_server, mailbox,
                                                  next_hop):
    message = mailbox["spam"]
    original = get_store(message.origin).load(message.storage_key).message
    login(page, live_server, "alice")
    _open(page, message)

    with page.expect_navigation():
        page.get_by_role("button", name="Release").click()

    assert len(next_hop.received) == 1
    sender, recipients, data = next_hop.received[0]
    assert (sender, recipients) == ("figures@remote.example", ["alice@example.test"])
    assert original in data.replace(b"\r\n", b"\n")
    assert "released" in page_text(page).lower()
    recipient = message.recipients.get()
    assert recipient.released_at is not None
    assert recipient.released_by.username == "alice"
    _assert_policy_kept(watch)


def test_alice_deletes_a_message_and_its_file_is_gone(page, watch, live_server, mailbox):
    message = mailbox["oldest"]
    store = get_store(message.origin)
    assert store.exists(message.storage_key)
    login(page, live_server, "alice")
    _open(page, message)

    with page.expect_navigation():
        page.get_by_role("button", name="Delete", exact=True).click()

    page.goto(f"{live_server.url}/")
    assert "Cheap watches for you" not in _subjects(page)
    assert len(_subjects(page)) == 4
    assert not Message.objects.filter(pk=message.pk).exists()
    assert not store.exists(message.storage_key)
    _assert_policy_kept(watch)


def test_alice_logs_out_and_the_list_asks_for_a_login_again(page, watch, live_server,
                                                           mailbox):
    login(page, live_server, "alice")

    with page.expect_navigation():
        page.get_by_role("button", name="Log out").click()
    assert urlsplit(page.url).path == "/login/"

    page.goto(f"{live_server.url}/")
    assert urlsplit(page.url).path == "/login/"
    assert "Quarterly figures for the board" not in page_text(page)
    _assert_policy_kept(watch)


def test_alice_deletes_all_her_messages_and_bobs_stay(page, watch, live_server, mailbox):
    alices = [m for name, m in mailbox.items() if name != "bob"]
    login(page, live_server, "alice")

    with page.expect_navigation():
        page.get_by_role("link", name="Delete all").click()
    assert "Delete 5 messages from your quarantine?" in page_text(page)
    assert Message.objects.count() == 6
    with page.expect_navigation():
        page.get_by_role("button", name="Delete 5 messages").click()

    assert "5 messages deleted." in page_text(page)
    page.goto(f"{live_server.url}/")
    assert _subjects(page) == []
    assert "No messages." in page_text(page)
    assert list(Message.objects.values_list("subject", flat=True)) == ["Bob's private offer"]
    assert not any(get_store(m.origin).exists(m.storage_key) for m in alices)
    _assert_policy_kept(watch)
