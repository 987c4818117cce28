"""Security edges of the quarantine viewer that the view tests do not reach: hostile mail
whose text decodes to characters a page cannot carry.

Some charsets a message may name decode attacker-chosen bytes to lone UTF-16 surrogates
(U+D800..U+DFFF): UTF-7 (`+2D0-` is a lone high surrogate), `unicode_escape` and
`raw_unicode_escape` (`\\ud800`). Such a `str` cannot be encoded as UTF-8, so it can reach
neither a page nor PostgreSQL. A hostile message must still give a page (render.py), and
one hostile message must never keep other mail out of the index.

Everything runs with the Django test client on real PostgreSQL and real store files.
"""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from quarantine.indexer import index_directory
from quarantine.models import Message
from quarantine.store import FileStore, generate_mail_id

# A lone high surrogate in each charset that produces one.
LONE_SURROGATE_BODIES = [
    pytest.param("utf-7", b"before +2D0- after", id="utf-7"),
    pytest.param("unicode_escape", b"before \\ud800 after", id="unicode_escape"),
    pytest.param("raw_unicode_escape", b"before \\ud800 after", id="raw_unicode_escape"),
]

# Subject =?UTF-7?Q?...?= whose payload decodes to a lone surrogate.
LONE_SURROGATE_SUBJECT = b"=?UTF-7?Q?quarterly_+2D0-_figures?="


def detail(message) -> str:
    return reverse("quarantine:detail", args=[message.mail_id])


def mail_ids(response) -> list[str]:
    return re.findall(r'<tr id="row-([^"]+)"', response.content.decode())


@pytest.fixture
def page_client(client):
    """The test client answering a view's exception with the 500 page, as a browser sees
    it, instead of raising it into the test."""
    client.raise_request_exception = False
    return client


@pytest.mark.parametrize("charset,payload", LONE_SURROGATE_BODIES)
def test_body_decoding_to_a_lone_surrogate_still_gives_the_text_page(
    page_client, world, make_message, charset, payload
):
    """A text part whose charset (UTF-7, unicode_escape, raw_unicode_escape) decodes the
    sender's bytes to a lone surrogate is still shown: the detail page answers 200 with the
    readable text around it, the surrogate replaced or made visible, never a server error."""
    raw = (
        b"From: Sender <sender@remote.example>\nTo: alice@example.test\nSubject: figures\n"
        b"MIME-Version: 1.0\nContent-Type: text/plain; charset=" + charset.encode() + b"\n"
        b"Content-Transfer-Encoding: 7bit\n\n" + payload + b"\n"
    )
    message = make_message(raw=raw, category="BANNED")
    page_client.force_login(world.alice)

    response = page_client.get(detail(message))

    assert response.status_code == 200
    body = response.content.decode()
    assert "before" in body and "after" in body


def test_attachment_name_decoding_to_a_lone_surrogate_still_gives_the_page(
    page_client, world, make_message
):
    """An attachment whose RFC 2231 file name is in UTF-7 and decodes to a lone surrogate
    is listed like any other (its name made visible), and the detail page answers 200."""
    raw = (
        b"From: Sender <sender@remote.example>\nTo: alice@example.test\nSubject: files\n"
        b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n\n"
        b"--B\nContent-Type: text/plain\n\nsee attachment\n"
        b"--B\nContent-Type: application/octet-stream\n"
        b"Content-Disposition: attachment; filename*=utf-7''invoice%2B2D0-.exe\n\nMZ\n"
        b"--B--\n"
    )
    message = make_message(raw=raw, category="BANNED")
    page_client.force_login(world.alice)

    response = page_client.get(detail(message))

    assert response.status_code == 200
    page = response.content.decode()
    assert "see attachment" in page and 'id="attachments"' in page


def test_shown_header_decoding_to_a_lone_surrogate_still_gives_the_page(
    page_client, world, make_message
):
    """A Cc display name in an encoded word (UTF-7) that decodes to a lone surrogate is shown
    made visible; the detail page answers 200. (Cc is not indexed, so this reaches the
    page's own header decoding in render.py / headers.py.)"""
    raw = (
        b"From: Sender <sender@remote.example>\nTo: alice@example.test\n"
        b"Cc: " + LONE_SURROGATE_SUBJECT + b" <cc@remote.example>\n"
        b"Subject: copied\n\nplain body\n"
    )
    message = make_message(raw=raw, category="BANNED")
    page_client.force_login(world.alice)

    response = page_client.get(detail(message))

    assert response.status_code == 200
    page = response.content.decode()
    assert "plain body" in page and "cc@remote.example" in page


def test_subject_decoding_to_a_lone_surrogate_is_indexed_and_listed(
    page_client, world, make_message
):
    """A message whose Subject is an encoded word that decodes to a lone surrogate is held
    and indexed like any other (the surrogate replaced or made visible): its recipient
    finds it in the list and can open it."""
    raw = (
        b"From: Sender <sender@remote.example>\nTo: alice@example.test\n"
        b"Subject: " + LONE_SURROGATE_SUBJECT + b"\n\nbody\n"
    )
    message = make_message(raw=raw, category="BANNED")
    page_client.force_login(world.alice)

    listed = page_client.get(reverse("quarantine:list"))
    assert listed.status_code == 200
    assert mail_ids(listed) == [message.mail_id]
    assert "quarterly" in listed.content.decode()
    assert page_client.get(detail(message)).status_code == 200


def test_one_message_with_such_a_subject_does_not_keep_other_mail_out_of_the_index(
    world, quarantine_dir
):
    """Indexing a quarantine directory (amavisd-new's files) in which one message has a
    Subject that decodes to a lone surrogate indexes every other message of the directory
    and does not fail as a whole: one hostile mail must not make everyone's held mail
    invisible in the viewer."""
    store = FileStore(quarantine_dir, subdir_levels=1)
    hostile = (
        b"From: Sender <sender@remote.example>\nTo: alice@example.test\n"
        b"Subject: " + LONE_SURROGATE_SUBJECT + b"\n\nbody\n"
    )
    ordinary = (
        b"From: Sender <sender@remote.example>\nTo: bob@example.test\n"
        b"Subject: an ordinary message\n\nbody\n"
    )
    hostile_id, _ = generate_mail_id()
    ordinary_id, _ = generate_mail_id()
    store.write(category="BANNED", mail_id=hostile_id, message=hostile,
                sender="sender@remote.example", recipients=["alice@example.test"])
    store.write(category="BANNED", mail_id=ordinary_id, message=ordinary,
                sender="sender@remote.example", recipients=["bob@example.test"])

    try:
        index_directory(quarantine_dir)
    except Exception as exc:  # noqa: BLE001 - the failure itself is what is reported
        pytest.fail(f"indexing the directory failed as a whole: {type(exc).__name__}: {exc}")

    assert Message.objects.filter(mail_id=ordinary_id).exists()
