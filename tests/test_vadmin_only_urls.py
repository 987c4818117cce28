"""Every URL of the administration console, found in the URLconf rather than listed by hand,
refuses normal users (403) and anonymous visitors (login redirect), for GET and POST; and
no console POST is accepted without a CSRF token."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import NoReverseMatch, URLPattern, URLResolver, get_resolver, reverse

from directory.models import Address
from quarantine.models import Message
from tests.conftest import PASSWORD

CONSOLE_PREFIX = "/console/"


def _walk(patterns, namespace: str = "") -> list[tuple[str, URLPattern]]:
    found = []
    for p in patterns:
        if isinstance(p, URLResolver):
            inner = f"{namespace}{p.namespace}:" if p.namespace else namespace
            found += _walk(p.url_patterns, inner)
        elif isinstance(p, URLPattern) and p.name:
            found.append((f"{namespace}{p.name}", p))
    return found


def _console_urls(object_id: int) -> list[str]:
    """Every named pattern whose reversed path lies under /console/, with dummy arguments
    (the id of an existing user, so that a refusal is not just a 404)."""
    urls = []
    for name, pattern in _walk(get_resolver().url_patterns):
        kwargs = {key: object_id for key in pattern.pattern.converters}
        try:
            path = reverse(name, kwargs=kwargs)
        except NoReverseMatch:
            # A pattern whose converter takes no number (a mail_id) is outside the console.
            continue
        if path.startswith(CONSOLE_PREFIX):
            urls.append(path)
    return sorted(set(urls))


@pytest.fixture
def console_urls(world, make_message) -> list[str]:
    make_message(recipients=["bob@example.test"])
    urls = _console_urls(world.bob.id)
    # If the walk found nothing the tests below would pass vacuously.
    assert reverse("directory:console") in urls
    assert reverse("directory:user_delete", args=[world.bob.id]) in urls
    assert len(urls) >= 8
    return urls


def _nothing_changed(world) -> None:
    assert User.objects.filter(pk=world.bob.pk).exists()
    assert Address.objects.filter(user=world.bob).count() == 1
    assert Message.objects.count() == 1
    world.vadmin.refresh_from_db()
    assert world.vadmin.check_password(PASSWORD)


POST_DATA = {
    "confirm": "on",
    "username": "mallory",
    "addresses": "bob@example.test\nmallory@example.test",
    "password1": "a long enough passphrase",
    "password2": "a long enough passphrase",
    "old_password": "wrong",
    "new_password1": "a long enough passphrase",
    "new_password2": "a long enough passphrase",
}


@pytest.mark.parametrize("method", ["get", "post"])
def test_a_normal_user_gets_403_on_every_console_url(client, world, console_urls, method):
    client.force_login(world.alice)
    for url in console_urls:
        response = getattr(client, method)(url, POST_DATA if method == "post" else {})
        assert response.status_code == 403, (method, url, response.status_code)
    _nothing_changed(world)
    assert not User.objects.filter(username="mallory").exists()


@pytest.mark.parametrize("method", ["get", "post"])
def test_anonymous_is_sent_to_login_from_every_console_url(client, world, console_urls, method):
    login = reverse("login")
    for url in console_urls:
        response = getattr(client, method)(url, POST_DATA if method == "post" else {})
        assert response.status_code == 302, (method, url, response.status_code)
        assert response["Location"].startswith(f"{login}?next="), (method, url)
    _nothing_changed(world)


def test_every_console_post_without_csrf_token_is_refused(world, console_urls):
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.vadmin)
    for url in console_urls:
        response = client.post(url, POST_DATA)
        assert response.status_code == 403, (url, response.status_code)
    _nothing_changed(world)
