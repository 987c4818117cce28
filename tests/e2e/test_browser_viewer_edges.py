"""What a person sees in Chromium at the edges of everyday use: a message whose text is
HTML beside a plain-text footer, the browser's Back button after a release and after
logging out, and an older page that a delete left empty. The site's Content-Security-Policy
is enforced and no page may break it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.e2e.conftest import Watch, login, page_text
from tests.e2e.test_browser_whole_path import next_hop  # noqa: F401 - a fixture

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

HTML_WITH_FOOTER = (
    b"From: Sender <sender@remote.example>\nTo: alice@example.test\nSubject: Board news\n"
    b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n\n"
    b"--B\nContent-Type: text/html; charset=utf-8\n\n"
    b"<html><body><p>The quarterly <b>figures</b> are attached.</p></body></html>\n"
    b"--B\nContent-Type: text/plain; charset=utf-8\n\n"
    b"Sent through the list.\n"
    b"--B--\n"
)


# How many lines the text inside an element takes on the screen.
_TEXT_LINES_JS = """el => {
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  const tops = new Set();
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const range = document.createRange();
    range.selectNodeContents(node);
    for (const box of range.getClientRects()) tops.add(Math.round(box.top));
  }
  return tops.size;
}"""


def _assert_policy_kept(watch: Watch) -> None:
    watch.assert_contained()
    assert watch.csp_violations == []


def test_an_html_body_beside_a_text_footer_is_read_as_text(page, watch, live_server, world,
                                                           make_message):
    make_message(raw=HTML_WITH_FOOTER)
    login(page, live_server, "alice")

    with page.expect_navigation():
        page.locator("a.subject", has_text="Board news").click()

    body = page.locator("#body")
    assert "The quarterly figures are attached." in body.inner_text()
    assert "Sent through the list." in body.inner_text()
    assert body.locator("b, p").count() == 0
    assert "shown as plain text" in page_text(page)
    _assert_policy_kept(watch)


def test_back_after_a_release_sends_nothing_again_and_shows_it_released(
    page, watch, live_server, world, make_message, next_hop  # noqa: F811 - the fixture
):
    """Release is a POST answered by a redirect: Back returns to the list as it is now,
    without the browser offering to send the form again, and nothing is delivered twice."""
    make_message(subject="Release me")
    login(page, live_server, "alice")
    with page.expect_navigation():
        page.get_by_role("button", name="Release").click()
    assert "Released to alice@example.test." in page_text(page)
    posts_before = len(watch.requests)

    page.go_back()
    page.wait_for_load_state()

    assert urlsplit(page.url).path == "/"
    assert len(next_hop.received) == 1
    row = page.locator("tr", has_text="Release me")
    assert "by alice" in row.inner_text()
    assert row.locator("button.release").count() == 0
    assert all(not url.endswith("/release") for url in watch.requests[posts_before:])
    _assert_policy_kept(watch)


def test_back_after_logging_out_shows_no_mail(page, watch, live_server, world, make_message):
    make_message(subject="Quarterly secret figures")
    login(page, live_server, "alice")
    assert "Quarterly secret figures" in page_text(page)
    with page.expect_navigation():
        page.get_by_role("button", name="Log out").click()

    page.go_back()
    page.wait_for_load_state()

    assert urlsplit(page.url).path == "/login/"
    assert "Quarterly secret figures" not in page_text(page)
    _assert_policy_kept(watch)


def test_deleting_the_last_row_of_the_last_page(page, watch, live_server, world, make_message,
                                                settings):
    """The user stays on the now empty older page, which says there is nothing older and
    leads back to the newest messages."""
    settings.QUARANTINE_PAGE_SIZE = 5
    subjects = [f"Offer number {n}" for n in range(6)]
    for subject in subjects:
        make_message(subject=subject)
    login(page, live_server, "alice")
    with page.expect_navigation():
        page.locator("#older").click()
    assert [s.strip() for s in page.locator("a.subject").all_inner_texts()] == ["Offer number 0"]

    with page.expect_navigation():
        page.get_by_role("button", name="Delete", exact=True).click()

    assert "Message deleted." in page_text(page)
    assert "No older messages." in page_text(page)
    with page.expect_navigation():
        page.locator("#newest").click()
    assert len(page.locator("a.subject").all_inner_texts()) == 5
    _assert_policy_kept(watch)


def test_an_ordinary_address_keeps_its_line_in_the_list(page, watch, live_server, world,
                                                        make_message):
    make_message(from_="someone.with.a.long.name@company.example",
                 subject="Minutes of the meeting of the board, with the figures")
    page.set_viewport_size({"width": 1280, "height": 800})
    login(page, live_server, "alice")

    lines = page.locator("td[data-label='From']").evaluate(_TEXT_LINES_JS)

    assert lines == 1
    _assert_policy_kept(watch)


@pytest.mark.parametrize("width", [1280, 1024, 390])
def test_a_very_long_sender_and_subject_do_not_widen_the_pages(page, watch, live_server, world,
                                                             make_message, width):
    """Header values without a space in them (a 300-character address, a subject of one
    long word) wrap inside the page: the list's Release and Delete buttons stay on the
    screen, and neither page scrolls sideways, on a desktop nor on a phone."""
    long_sender = "a" * 250 + "@" + "b" * 40 + ".example"
    message = make_message(from_=long_sender, subject="S" * 290)
    page.set_viewport_size({"width": width, "height": 800})
    login(page, live_server, "alice")

    overflow = "() => document.documentElement.scrollWidth - window.innerWidth"
    assert page.evaluate(overflow) <= 0
    box = page.locator(f"#row-{message.mail_id} button.delete").bounding_box()
    assert box is not None and box["x"] + box["width"] <= width

    with page.expect_navigation():
        page.locator(f"#row-{message.mail_id} a.subject").click()
    assert page.evaluate(overflow) <= 0
    _assert_policy_kept(watch)


def test_delete_all_asks_first_and_says_how_many(page, watch, live_server, world,
                                                 make_message):
    from quarantine.models import Message

    make_message(subject="First offer")
    make_message(subject="Second offer",
                 recipients=["alice@example.test", "alice.alias@example.test"])
    make_message(subject="Bob's offer", recipients=["bob@example.test"])
    login(page, live_server, "alice")

    with page.expect_navigation():
        page.get_by_role("link", name="Delete all").click()

    assert "Delete 2 messages from your quarantine?" in page_text(page)
    assert Message.objects.count() == 3
    with page.expect_navigation():
        page.get_by_role("link", name="Cancel").click()
    assert [s.strip() for s in page.locator("a.subject").all_inner_texts()] == [
        "Second offer", "First offer"
    ]

    with page.expect_navigation():
        page.get_by_role("link", name="Delete all").click()
    with page.expect_navigation():
        page.get_by_role("button", name="Delete 2 messages").click()

    assert urlsplit(page.url).path == "/"
    assert "2 messages deleted." in page_text(page)
    assert "No messages." in page_text(page)
    assert list(Message.objects.values_list("subject", flat=True)) == ["Bob's offer"]
    _assert_policy_kept(watch)


def test_vadmin_deletes_a_row_of_alices_list_and_bob_keeps_his_copy(page, watch, live_server,
                                                                    world, make_message):
    from quarantine.models import Recipient

    message = make_message(subject="Shared offer",
                           recipients=["alice@example.test", "bob@example.test"])
    login(page, live_server, "vadmin")
    page.goto(f"{live_server.url}/?user={world.alice.id}")

    with page.expect_navigation():
        page.locator(f"#row-{message.mail_id} button.delete").click()

    assert urlsplit(page.url).query == f"user={world.alice.id}"
    assert "Deleted alice's copy (alice@example.test)" in page_text(page)
    assert list(Recipient.objects.values_list("address", flat=True)) == ["bob@example.test"]
    page.goto(f"{live_server.url}/")
    row = page.locator(f"#row-{message.mail_id}")
    assert "bob@example.test" in row.inner_text()
    _assert_policy_kept(watch)


def test_back_to_the_list_keeps_the_search_the_category_and_the_page(page, watch, live_server,
                                                                      world, make_message,
                                                                      settings):
    settings.QUARANTINE_PAGE_SIZE = 5
    for n in range(7):
        make_message(subject=f"Offer number {n}")
    make_message(subject="Offer in another category", category="BANNED")
    login(page, live_server, "alice")
    page.fill("#id_q", "Offer number")
    page.select_option("#id_category", "SPAM")
    with page.expect_navigation():
        page.locator("#filter-submit").click()
    with page.expect_navigation():
        page.locator("#older").click()
    older = page.url

    with page.expect_navigation():
        page.locator("a.subject", has_text="Offer number 1").click()
    with page.expect_navigation():
        page.get_by_role("link", name="Back to the list").click()

    assert page.url == older
    assert page.input_value("#id_q") == "Offer number"
    assert page.input_value("#id_category") == "SPAM"
    assert [s.strip() for s in page.locator("a.subject").all_inner_texts()] == [
        "Offer number 1", "Offer number 0"
    ]
    _assert_policy_kept(watch)


def test_a_links_target_is_shown_as_text_and_never_as_a_link(page, watch, live_server, world,
                                                             make_message):
    make_message(
        subject="Your account is locked", body=None,
        html='<p>Please <a href="https://evil.example/unlock">click here</a> today.</p>',
    )
    login(page, live_server, "alice")

    with page.expect_navigation():
        page.locator("a.subject", has_text="Your account is locked").click()

    body = page.locator("#body")
    assert "Please click here <https://evil.example/unlock> today." in body.inner_text()
    assert body.locator("a").count() == 0
    assert page.locator("a[href*='evil.example']").count() == 0
    _assert_policy_kept(watch)


def test_times_on_the_list_and_the_message_page_name_their_zone(page, watch, live_server,
                                                                world, make_message, settings):
    from datetime import UTC, datetime

    settings.TIME_ZONE = "Europe/Berlin"
    make_message(subject="Zoned", received_at=datetime(2026, 11, 20, 10, 0, tzinfo=UTC),
                 date=datetime(2026, 11, 20, 9, 58, tzinfo=UTC))
    login(page, live_server, "alice")

    assert page.locator("td[data-label='Date']").inner_text() == "2026-11-20 11:00 CET"
    with page.expect_navigation():
        page.locator("a.subject", has_text="Zoned").click()
    envelope = page.locator("#envelope").inner_text()
    assert "2026-11-20 11:00:00 CET" in envelope
    assert "Fri, 20 Nov 2026 09:58:00 +0000" in page.locator("#headers").inner_text()
    _assert_policy_kept(watch)
