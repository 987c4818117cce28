"""Real pages in real Chromium: one browser per test module, a fresh context per test.

Every context watches for the three signs that mail content escaped into the page:
a JavaScript dialog, a request to any host but the live server (those are aborted before
they leave the machine), and a navigation away from the live server. Debian's chromium is
used as installed; no browser is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

from tests.conftest import PASSWORD

CHROMIUM = os.environ.get("SPAMVIEWER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Generous enough for a loaded machine, short enough that a hung page fails quickly.
TIMEOUT_MS = 15_000


@dataclass
class Watch:
    """What a browser context did that the site itself never does."""

    origin: str
    dialogs: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    responses: list[tuple[str, int]] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    popups: list[str] = field(default_factory=list)
    foreign_navigations: list[str] = field(default_factory=list)

    def take_problems(self) -> list[str]:
        """What happened since the last call that shows content escaping; then forget it."""
        problems = (
            [f"a script opened a dialog: {d}" for d in self.dialogs]
            + [f"the page tried to load from another host: {u}" for u in self.external_requests]
            + [f"the page navigated away from the site: {u}" for u in self.foreign_navigations]
            + [f"the page opened a window: {u}" for u in self.popups]
        )
        for seen in (self.dialogs, self.external_requests, self.foreign_navigations,
                     self.popups):
            seen.clear()
        return problems

    def assert_contained(self) -> None:
        """No script ran, nothing was fetched from elsewhere, nobody was sent elsewhere."""
        assert self.take_problems() == []


def _same_origin(url: str, origin: str) -> bool:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" == origin


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One Chromium per test module.

    While Playwright's sync API is alive it keeps an asyncio loop marked as running in the
    main thread, and Django then refuses every ORM call from the test code. The browser
    therefore lives no longer than the module using it, and Django's guard is relaxed only
    for that time: a browser living for the whole session would break the database tests
    that run after it.
    """
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-packages.txt installs it)")
    from playwright.sync_api import sync_playwright

    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            # launch() gives the browser a fresh temporary profile and removes it on close.
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture(scope="session", autouse=True)
def _static_root_for_live_server(tmp_path_factory) -> Iterator[None]:
    """An existing STATIC_ROOT from before the live server starts.

    Whitenoise looks at STATIC_ROOT once, when the live server (session-scoped) loads its
    middleware, and warns when it is missing; the per-test `static_files` fixture comes too
    late for that. The live server's own static handler serves the stylesheet from
    STATICFILES_DIRS.
    """
    from django.test import override_settings

    root = tmp_path_factory.getbasetemp() / "staticfiles"
    root.mkdir(exist_ok=True)
    with override_settings(STATIC_ROOT=root):
        yield


def open_context(browser, live_server, **options):
    """A new context that aborts and records every request not made to the live server."""
    origin = live_server.url.rstrip("/")
    watch = Watch(origin=origin)
    context = browser.new_context(**options)
    context.set_default_timeout(TIMEOUT_MS)

    def route(route) -> None:
        url = route.request.url
        watch.requests.append(url)
        if _same_origin(url, origin):
            route.continue_()
        else:
            watch.external_requests.append(url)
            route.abort("blockedbyclient")

    def on_dialog(dialog) -> None:
        watch.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def on_console(message) -> None:
        if message.type != "error":
            return
        if "Content Security Policy" in message.text or "Content-Security-Policy" in message.text:
            watch.csp_violations.append(message.text)
        else:
            watch.console_errors.append(message.text)

    def on_frame_navigated(frame) -> None:
        url = frame.url
        if url not in ("about:blank", "") and not _same_origin(url, origin):
            watch.foreign_navigations.append(url)

    def on_page(page) -> None:
        if len(context.pages) > 1:
            watch.popups.append(page.url)
        page.on("console", on_console)
        page.on("framenavigated", on_frame_navigated)

    context.route("**/*", route)
    context.on("response", lambda response: watch.responses.append((response.url,
                                                                      response.status)))
    context.on("dialog", on_dialog)
    context.on("page", on_page)
    return context, watch


@pytest.fixture
def context_options() -> dict:
    """Options for each test's browser context; a module overrides this fixture to change
    them (the hostile content tests switch the site's CSP off)."""
    return {}


@pytest.fixture
def _browsing(browser, live_server, context_options):
    context, watch = open_context(browser, live_server, **context_options)
    yield context, watch
    context.close()


@pytest.fixture
def watch(_browsing) -> Watch:
    return _browsing[1]


@pytest.fixture
def page(_browsing):
    return _browsing[0].new_page()


def login(page, live_server, username: str, password: str = PASSWORD) -> None:
    """Log in through the login form, as a person would, and land on the message list."""
    page.goto(f"{live_server.url}/login/")
    page.fill('input[name="username"]', username)
    page.fill('input[name="password"]', password)
    with page.expect_navigation() as navigation:
        page.click('form[action="/login/"] button[type="submit"]')
    status = navigation.value.status
    assert status == 200 and urlsplit(page.url).path != "/login/", (
        f"{username} could not log in: the form's POST got {status} at {page.url}"
    )


def page_text(page) -> str:
    return page.inner_text("body")


@pytest.fixture
def quarantine_raw(settings):
    """Put raw message bytes into the quarantine the way the filter does: write the file
    to the store, then index it with the indexer. Returns the saved Message."""
    from quarantine.indexer import index_file
    from quarantine.store import generate_mail_id, get_store

    def put(raw: bytes, *, category: str = "SPAM", recipients=("alice@example.test",),
            sender: str = "sender@remote.example"):
        store = get_store()
        mail_id, _ = generate_mail_id()
        key = store.write(category=category, mail_id=mail_id, message=raw, sender=sender,
                          recipients=list(recipients))
        return index_file(store, key)

    return put


# Attributes that name a URL; mail content must never put one on the page.
_URL_ATTRIBUTES = [
    "href", "src", "action", "formaction", "srcset", "poster", "data", "background",
    "xlink:href", "ping", "manifest", "codebase", "cite", "longdesc", "lowsrc", "dynsrc",
]
# Elements the site never renders; any of them on a page came from a message.
FOREIGN_ELEMENTS = [
    "script", "iframe", "frame", "frameset", "object", "embed", "applet", "svg", "math",
    "base", "meta[http-equiv]", "style", "img", "video", "audio", "source", "picture",
    "template", "portal", "marquee",
]

_DOM_FINDINGS_JS = r"""
([urlAttributes, foreign]) => {
  const findings = [];
  const here = location.origin;
  for (const selector of foreign) {
    for (const el of document.querySelectorAll(selector)) {
      findings.push(`element ${selector}: ${el.outerHTML.slice(0, 120)}`);
    }
  }
  for (const el of document.querySelectorAll('*')) {
    for (const attr of el.attributes) {
      const name = attr.name.toLowerCase();
      if (name.startsWith('on')) {
        findings.push(`handler ${el.tagName.toLowerCase()} ${name}=${attr.value.slice(0, 80)}`);
      }
      if (name === 'srcdoc' || name === 'http-equiv') {
        findings.push(`attribute ${el.tagName.toLowerCase()} ${name}`);
      }
      if (!urlAttributes.includes(name)) continue;
      const squeezed = attr.value.replace(/[\s\u0000-\u001f]/g, '').toLowerCase();
      if (/^(javascript|vbscript|data):/.test(squeezed)) {
        findings.push(`script URL ${el.tagName.toLowerCase()} ${name}=${attr.value.slice(0, 80)}`);
        continue;
      }
      for (const part of name === 'srcset' ? attr.value.split(',') : [attr.value]) {
        let url;
        try { url = new URL(part.trim().split(/\s+/)[0], location.href); } catch { continue; }
        if (url.protocol !== 'mailto:' && url.origin !== here) {
          findings.push(`off-site ${el.tagName.toLowerCase()} ${name}=${attr.value.slice(0, 80)}`);
        }
      }
    }
  }
  return findings;
}
"""


def dom_findings(page) -> list[str]:
    """Elements, event handlers and URLs on the page that the site's own templates never
    produce: if any is there, markup from a message reached the DOM."""
    return page.evaluate(_DOM_FINDINGS_JS, [_URL_ATTRIBUTES, FOREIGN_ELEMENTS])


def inert_problems(page, watch: Watch) -> list[str]:
    """Everything that shows mail content was not kept to text on the page shown now."""
    problems = watch.take_problems()
    if page.evaluate("() => typeof window.__pwned") != "undefined":
        problems.append("a payload ran: window.__pwned is set")
    problems += dom_findings(page)
    text = page_text(page)
    # Bidi overrides and NUL reach the reader only as visible escapes.
    problems += [f"raw {char!r} in the page text"
                 for char in ("\u202e", "\u202d", "\u2066", "\u2067", "\u0000")
                 if char in text]
    return problems


def assert_inert(page, watch: Watch) -> None:
    """The page shows mail content as text only: nothing ran, loaded or was injected."""
    assert inert_problems(page, watch) == []
