"""Hostile mail on the real pages, in Chromium: shown as text, never run, never fetched.

The browser contexts here ignore the site's Content-Security-Policy, so that each page is
judged on its escaping alone: a payload that reached the DOM would run and be caught. A
separate test shows that the policy, on its own, stops script that got into a page.
(Security tests, cases 67, 68, 71, 72.)
"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User

from directory.models import Address
from tests.e2e.conftest import assert_inert, inert_problems, login, open_context, page_text
from tests.e2e.hostile import JS, SCRIPT, VECTORS

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def context_options() -> dict:
    return {"bypass_csp": True}


@pytest.fixture
def hostile_quarantine(world, quarantine_raw, settings) -> dict[str, object]:
    """Every vector in alice's quarantine, all on one list page; Message by vector name.

    The pages of all vectors are checked in one test each (list, search, detail) and the
    failures are reported per vector: one quarantine and one login per page kind keeps the
    whole corpus to seconds where a database per vector would take minutes.
    """
    settings.QUARANTINE_PAGE_SIZE = len(VECTORS) + 10
    return {v.name: quarantine_raw(v.raw, category=v.category, recipients=list(v.recipients))
            for v in VECTORS}


def _search(page, query: str) -> None:
    page.fill('input[name="q"]', query)
    with page.expect_navigation():
        page.press('input[name="q"]', "Enter")


def _missing(text: str, wanted) -> list[str]:
    return [f"{want!r} is not shown" for want in wanted if want not in text]


def _row(page, message):
    return page.locator(f'tr:has(a.subject[href="/message/{message.mail_id}/"])')


def test_list_page_shows_every_hostile_message_as_text(page, watch, live_server,
                                                       hostile_quarantine):
    login(page, live_server, "alice")

    assert_inert(page, watch)
    assert page.locator("a.subject").count() == len(VECTORS)
    problems = {}
    for vector in VECTORS:
        row = _row(page, hostile_quarantine[vector.name])
        if row.count() != 1:
            problems[vector.name] = [f"{row.count()} rows link to its page"]
        elif found := _missing(row.inner_text(), (vector.marker, *vector.in_list)):
            problems[vector.name] = found
    assert problems == {}


def test_search_results_show_each_hostile_message_as_text(page, watch, live_server,
                                                          hostile_quarantine):
    login(page, live_server, "alice")

    problems = {}
    for vector in VECTORS:
        _search(page, vector.token)
        found = _missing(page_text(page), (vector.marker, *vector.in_list))
        results = page.locator("a.subject").count()
        if results != 1:
            found.append(f"{results} results for {vector.token!r}")
        found += inert_problems(page, watch)
        if found:
            problems[vector.name] = found
    assert problems == {}


def test_detail_pages_show_each_hostile_message_as_text(page, watch, live_server,
                                                        hostile_quarantine):
    login(page, live_server, "alice")

    problems = {}
    for vector in VECTORS:
        response = page.goto(
            f"{live_server.url}/message/{hostile_quarantine[vector.name].mail_id}/")
        found = [] if response.status == 200 else [f"status {response.status}"]
        found += _missing(page_text(page), (vector.marker, *vector.in_detail))
        found += inert_problems(page, watch)
        if found:
            problems[vector.name] = found
    assert problems == {}


def test_recipient_address_with_markup_is_text_for_vadmin(page, watch, live_server, world,
                                                          quarantine_raw):
    """An envelope recipient is attacker-chosen too (Proxmox CVE-2014-2325). The store
    refuses `<`, `>`, CR, LF and NUL in envelope addresses and the indexer spaces; quotes,
    `&`, `;` and `=` remain."""
    address = f'"x\'onfocus={JS}//&#60;script&#62;"@example.test'
    message = quarantine_raw(VECTORS[0].raw, recipients=(address,))
    login(page, live_server, "vadmin")

    assert_inert(page, watch)
    assert address in _row(page, message).inner_text()
    with page.expect_navigation():
        page.locator("a.subject", has_text=VECTORS[0].token).click()
    assert_inert(page, watch)
    assert address in page_text(page)


def test_console_shows_hostile_user_names_and_addresses_as_text(page, watch, live_server,
                                                                world):
    """Names and addresses can come from the directory, so they are as hostile as mail."""
    hostile = User.objects.create_user(f"<svg onload={JS}>", "", None, first_name=SCRIPT)
    Address.objects.create(address=f'"><img src=x onerror={JS}>@example.test', user=hostile,
                           source=Address.SOURCE_LDAP)
    login(page, live_server, "vadmin")

    page.goto(f"{live_server.url}/console/users/")
    assert_inert(page, watch)
    assert f"<svg onload={JS}>" in page_text(page)

    with page.expect_navigation():
        page.get_by_role("link", name=f"<svg onload={JS}>").click()
    assert_inert(page, watch)
    assert f'"><img src=x onerror={JS}>@example.test' in page_text(page)


# The checks themselves ------------------------------------------------------------------

BROKEN_PAGES = {
    "script element": SCRIPT,
    "event handler": f"<img src=x onerror={JS}>",
    "svg animation": f"<svg><animate onbegin={JS} attributeName=x dur=1s>",
    "details toggle": f"<details open ontoggle={JS}><summary>x</summary></details>",
    "remote image": "<img src=http://remote.example/x.png>",
    "remote stylesheet": "<link rel=stylesheet href=http://remote.example/x.css>",
    "meta refresh": '<meta http-equiv="refresh" content="0;url=http://remote.example/">',
    "frame": "<iframe src=http://remote.example/></iframe>",
    "script link": f'<a href="javascript:{JS}">x</a>',
    "bidi override": "invoice\u202eexe.pdf",
}


@pytest.mark.parametrize("markup", BROKEN_PAGES.values(), ids=BROKEN_PAGES.keys())
def test_the_checks_catch_markup_that_reached_a_page(page, watch, live_server, markup):
    """A page that rendered mail markup as HTML fails these tests (so they can fail)."""
    url = f"{live_server.url}/unescaped-probe/"
    page.route(url, lambda route: route.fulfill(
        status=200, content_type="text/html; charset=utf-8",
        body=f"<!doctype html><title>probe</title><p>Quarterly figures</p>{markup}"))
    page.goto(url)
    page.wait_for_timeout(300)  # the animation's onbegin and the refresh fire after load

    with pytest.raises(AssertionError):
        assert_inert(page, watch)


def test_site_policy_alone_blocks_script_that_reached_a_page(browser, live_server):
    """With the CSP enforced, script injected into a real page's HTML does not run."""
    context, watch = open_context(browser, live_server)
    try:
        page = context.new_page()
        injected = (f"<p id=probe>probe</p>{SCRIPT}<img src=x onerror={JS}>"
                    f"<img src=http://remote.example/x.png>")

        def inject(route) -> None:
            response = route.fetch()
            body = response.text().replace("</main>", injected + "</main>")
            route.fulfill(response=response, body=body)

        page.route(f"{live_server.url}/login/", inject)
        page.goto(f"{live_server.url}/login/")
        page.wait_for_selector("#probe")

        assert page.evaluate("() => typeof window.__pwned") == "undefined"
        watch.assert_contained()
        assert watch.csp_violations, "the browser reported no blocked script"
    finally:
        context.close()
