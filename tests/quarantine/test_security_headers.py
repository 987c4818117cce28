"""Every page carries the security headers, error pages included."""

from __future__ import annotations

import pytest
from django.urls import reverse


def assert_security_headers(response) -> None:
    csp = response["Content-Security-Policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert response["X-Frame-Options"] == "DENY"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("page", ["list", "detail", "download", "login", "missing", "hostile"])
def test_every_page_has_the_security_headers(client, world, make_message, page):
    message = make_message()
    client.force_login(world.alice)
    url = {
        "list": reverse("quarantine:list"),
        "detail": reverse("quarantine:detail", args=[message.mail_id]),
        "download": reverse("quarantine:download", args=[message.mail_id]),
        "login": reverse("login"),
        "missing": "/message/NoSuchMessage1/",
        "hostile": "/message/<script>alert(1)</script>/",
    }[page]

    assert_security_headers(client.get(url))


@pytest.mark.parametrize("action", ["release", "delete"])
def test_post_answers_have_the_security_headers(client, world, make_message, action):
    message = make_message(category="VIRUS")
    client.force_login(world.alice)
    assert_security_headers(client.post(reverse(f"quarantine:{action}", args=[message.mail_id])))


def test_not_found_page_does_not_echo_the_path(client, world):
    client.force_login(world.alice)

    response = client.get("/message/<script>alert(1)</script>/")

    assert response.status_code == 404
    assert b"<script>alert(1)" not in response.content
    assert b"%3Cscript" not in response.content and b"&lt;script" not in response.content


def test_pages_carry_no_script_and_no_inline_style(client, world, make_message):
    message = make_message()
    client.force_login(world.alice)
    for url in (reverse("quarantine:list"), reverse("quarantine:detail", args=[message.mail_id])):
        page = client.get(url).content.decode().lower()
        assert "<script" not in page and "<style" not in page and " style=" not in page
        assert " on" + "click=" not in page
