"""Login and logout: local redirects only, a new session at login, logout by POST."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from django.contrib.sessions.backends.db import SessionStore
from django.urls import reverse

from tests.conftest import PASSWORD

LOGIN = reverse("login")


def test_login_with_the_right_password_goes_to_the_list(client, world):
    response = client.post(LOGIN, {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    assert response["Location"] == reverse("quarantine:list")


def test_wrong_password_shows_the_form_again(client, world):
    response = client.post(LOGIN, {"username": "alice", "password": "wrong"})
    assert response.status_code == 200
    assert "not right" in response.content.decode()
    assert "_auth_user_id" not in client.session


def test_local_next_is_followed(client, world):
    response = client.post(LOGIN, {"username": "alice", "password": PASSWORD,
                                   "next": "/?category=SPAM"})
    assert response["Location"] == "/?category=SPAM"


@pytest.mark.parametrize("target", [
    "//evil.com",
    "/\\evil.com",
    "\\\\evil.com",
    "https:evil.com",
    "https://evil.com",
    "javascript:alert(1)",
    "/%2F%2Fevil.com",
    "https://evil.com@127.0.0.1",
    "http://127.0.0.1@evil.com/",
    "\x00//evil.com",
    " //evil.com",
])
def test_next_never_leads_off_the_site(client, world, target):
    response = client.post(LOGIN, {"username": "alice", "password": PASSWORD, "next": target})

    assert response.status_code == 302
    location = response["Location"]
    parts = urlsplit(location)
    assert not parts.scheme and not parts.netloc
    assert location.startswith("/") and not location.startswith(("//", "/\\"))
    assert "evil.com" not in location or location == "/%2F%2Fevil.com"


def test_next_on_the_login_page_is_escaped(client, world):
    page = client.get(LOGIN, {"next": '"><script>alert(1)</script>'}).content.decode()
    assert "<script>alert(1)" not in page


def test_session_key_changes_at_login(client, world):
    # A session planted before login (session fixation) must not become the logged-in one.
    planted = SessionStore()
    planted["planted"] = True
    planted.create()
    client.cookies["sessionid"] = planted.session_key

    client.post(LOGIN, {"username": "alice", "password": PASSWORD})

    new_key = client.cookies["sessionid"].value
    assert new_key != planted.session_key
    assert SessionStore(session_key=new_key).get("_auth_user_id") == str(world.alice.id)
    assert not SessionStore().exists(planted.session_key)


def test_logout_is_post_only_and_ends_the_session_on_the_server(client, world):
    client.post(LOGIN, {"username": "alice", "password": PASSWORD})
    key = client.cookies["sessionid"].value

    assert client.get(reverse("logout")).status_code == 405
    assert client.get(reverse("quarantine:list")).status_code == 200

    response = client.post(reverse("logout"))

    assert response.status_code == 302
    assert not SessionStore().exists(key)
    assert client.get(reverse("quarantine:list")).status_code == 302


def test_logged_in_user_visiting_login_is_sent_to_the_list(client, world):
    client.force_login(world.alice)
    response = client.get(LOGIN)
    assert response.status_code == 302
    assert response["Location"] == reverse("quarantine:list")
