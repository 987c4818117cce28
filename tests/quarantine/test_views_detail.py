"""The message page: who may see it, and that mail content is only ever text."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tests.quarantine.test_render import HOSTILE_HTML


def detail(message) -> str:
    return reverse("quarantine:detail", args=[message.mail_id])


def test_owner_sees_headers_text_and_envelope(client, world, make_message):
    message = make_message(subject="Quarterly report", body="Numbers are up.\n",
                           sender="bounce@remote.example", spam_score=7.5,
                           reasons="BAYES_99, URIBL_BLACK")
    client.force_login(world.alice)

    page = client.get(detail(message)).content.decode()

    assert '<h1 id="subject">Quarterly report</h1>' in page
    assert "Numbers are up." in page
    assert "bounce@remote.example" in page
    assert "7.5" in page and "BAYES_99, URIBL_BLACK" in page
    assert "<dt>From</dt><dd>Sender &lt;sender@remote.example&gt;</dd>" in page


def test_alias_owner_sees_the_message(client, world, make_message):
    message = make_message(recipients=["alice.alias@example.test"])
    client.force_login(world.alice)
    assert client.get(detail(message)).status_code == 200


def test_outsider_gets_404_on_detail(client, world, make_message):
    message = make_message(recipients=["alice@example.test"])
    client.force_login(world.bob)
    assert client.get(detail(message)).status_code == 404


def test_anonymous_user_is_sent_to_login_from_detail(client, world, make_message):
    message = make_message()
    response = client.get(detail(message))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_vadmin_sees_any_message(client, world, make_message):
    message = make_message(recipients=["bob@example.test"])
    client.force_login(world.vadmin)
    assert client.get(detail(message)).status_code == 200


def test_shared_message_lists_only_the_users_own_recipients(client, world, make_message):
    message = make_message(recipients=["alice@example.test", "bob@example.test"])
    client.force_login(world.bob)

    page = client.get(detail(message)).content.decode()

    assert "<li>bob@example.test" in page
    assert "<li>alice@example.test" not in page


def test_hostile_html_mail_reaches_the_page_as_text_only(client, world, make_message):
    message = make_message(body=None, html=HOSTILE_HTML)
    client.force_login(world.alice)

    response = client.get(detail(message))
    page = response.content.decode()

    assert response["Content-Type"] == "text/html; charset=utf-8"
    assert "Dear customer," in page
    assert "Your invoice &amp; receipt are ready." in page
    for bad in ("<script", "<svg", "onload", "<meta http-equiv", "<base", "<details",
                "evil.example", "<img", "expression(", "javascript:"):
        assert bad not in page, bad


def test_hostile_header_values_and_file_names_are_escaped(client, world, make_message):
    raw = (b"From: \"<script>alert(1)</script>\" <x@remote.example>\n"
           b"To: alice@example.test\n"
           b"Subject: =?UTF-8?B?PGltZyBzcmM9eCBvbmVycm9yPWFsZXJ0KDIpPg==?=\n"
           b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n\n--B\n"
           b"Content-Type: text/plain\n\nbody\n--B\n"
           b"Content-Type: application/octet-stream; name=\"<svg onload=alert(3)>.exe\"\n"
           b"Content-Disposition: attachment\n\nx\n--B--\n")
    message = make_message(raw=raw, subject="<img src=x onerror=alert(2)>")
    client.force_login(world.alice)

    page = client.get(detail(message)).content.decode()

    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "<svg onload" not in page and "&lt;svg onload=alert(3)&gt;.exe" in page


def test_large_body_is_cut_with_a_note(client, world, make_message):
    message = make_message(body="A" * 1_000_000 + "\n")
    client.force_login(world.alice)

    page = client.get(detail(message)).content.decode()

    assert 'id="truncated"' in page
    assert len(page) < 400_000


def test_missing_file_gives_a_page_not_an_error(client, world, make_message):
    from quarantine.store import get_store

    message = make_message()
    get_store(message.origin).path(message.storage_key).unlink()
    client.force_login(world.alice)

    response = client.get(detail(message))

    assert response.status_code == 200
    assert "cannot be read" in response.content.decode()


@pytest.mark.parametrize("path", [
    "/message/../../etc/passwd/",
    "/message/..%2f..%2fetc%2fpasswd/",
    "/message/%2e%2e%2f%2e%2e%2fetc%2fpasswd/",
    "/message/..\\..\\etc\\passwd/",
    "/message/abc%00defgh/",
    "/message/%2Fetc%2Fpasswd/",
    "/message/" + "a" * 33 + "/",
    "/message/abc/",
    "/message/<script>alert(1)</script>/",
])
def test_hostile_ids_give_404(client, world, make_message, path):
    make_message()
    client.force_login(world.vadmin)

    response = client.get(path)

    assert response.status_code == 404
    assert b"<script>alert(1)" not in response.content
    assert b"passwd" not in response.content


def test_release_and_download_buttons_follow_the_policy(client, world, make_message):
    virus = make_message(category="VIRUS")
    spam = make_message(category="SPAM")
    client.force_login(world.alice)

    virus_page = client.get(detail(virus)).content.decode()
    spam_page = client.get(detail(spam)).content.decode()

    assert ">Download<" not in virus_page and ">Release<" not in virus_page
    assert ">Download<" in spam_page and ">Release<" in spam_page
    assert ">Delete<" in virus_page
