"""The viewer as its users use it: what the message page shows of real-world mail (HTML
bodies beside text footers, charset labels as mail clients write them, format=flowed,
forwarded messages), what the list shows on an older page that became empty, and the
site's own error pages.

Pages are requested with the Django test client on real PostgreSQL; messages are real
store files indexed by the real indexer (tests/conftest.py `make_message`).
"""

from __future__ import annotations

import re
from email.message import EmailMessage

import pytest
from django.test import Client
from django.urls import reverse

from quarantine.render import render_message

LIST = reverse("quarantine:list")


def detail(message) -> str:
    return reverse("quarantine:detail", args=[message.mail_id])


def mail_ids(response) -> list[str]:
    return re.findall(r'<tr id="row-([^"]+)"', response.content.decode())


def shown_body(response) -> str:
    """The text of the page's `<pre id="body">`, as the browser shows it."""
    import html

    match = re.search(r'<pre class="body" id="body">(.*?)</pre>', response.content.decode(),
                      re.S)
    assert match, "the page has no text view"
    return html.unescape(match.group(1))


def text_part(charset: str, payload: bytes, *, extra: str = "") -> bytes:
    return (
        b"From: Sender <sender@remote.example>\nTo: alice@example.test\nSubject: text\n"
        b"MIME-Version: 1.0\nContent-Type: text/plain; charset=" + charset.encode()
        + extra.encode() + b"\nContent-Transfer-Encoding: 8bit\n\n" + payload + b"\n"
    )


# --- The text view ----------------------------------------------------------------------


def test_html_body_beside_a_plain_text_footer_is_shown(client, world, make_message):
    """A multipart/mixed message whose body is HTML, followed by a text/plain part (a
    mailing list's or a gateway's footer), shows the HTML body as text before the footer:
    the footer alone is not the message."""
    raw = (
        b"From: Sender <sender@remote.example>\nTo: alice@example.test\nSubject: news\n"
        b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n\n"
        b"--B\nContent-Type: text/html; charset=utf-8\n\n"
        b"<html><body><p>The quarterly <b>figures</b> are attached.</p></body></html>\n"
        b"--B\nContent-Type: text/plain; charset=utf-8\n\n"
        b"-- \nSent through the list. Unsubscribe: list@remote.example\n"
        b"--B--\n"
    )
    message = make_message(raw=raw)
    client.force_login(world.alice)

    body = shown_body(client.get(detail(message)))

    assert "The quarterly figures are attached." in body
    assert "Sent through the list." in body
    assert body.index("quarterly") < body.index("Sent through")
    assert "<b>" not in body and "<p>" not in body


def test_an_empty_plain_alternative_does_not_hide_the_html_one():
    """multipart/alternative whose text/plain part is empty (as some bulk mailers send it)
    shows the HTML alternative as text rather than an empty page."""
    msg = EmailMessage()
    msg["Subject"] = "offer"
    msg.set_content("\n")
    msg.add_alternative("<p>Your order has shipped.</p>", subtype="html")

    rendered = render_message(msg.as_bytes())

    assert rendered.body == "Your order has shipped."
    assert rendered.from_html


def test_plain_alternative_still_wins_over_html_inside_a_mixed_message():
    """The alternative rule holds inside multipart/mixed: the text/plain alternative is
    shown, the HTML one is not added to it."""
    msg = EmailMessage()
    msg["Subject"] = "both"
    msg.set_content("plain version\n")
    msg.add_alternative("<p>html version</p>", subtype="html")
    msg.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf",
                       filename="a.pdf")

    rendered = render_message(msg.as_bytes())

    assert "plain version" in rendered.body
    assert "html version" not in rendered.body
    assert not rendered.from_html


@pytest.mark.parametrize("charset,payload,expected", [
    # Labels mail clients write that Python's codecs do not know by that name.
    ("iso-8859-8-i", "שלום עולם".encode("iso-8859-8"), "שלום עולם"),
    ("windows-874", "สวัสดี".encode("cp874"), "สวัสดี"),
    ("x-mac-roman", "Café ™".encode("mac_roman"), "Café ™"),
    # Labels whose text is, in practice, the wider encoding browsers read them as.
    ("iso-8859-1", "“quoted” – 5 €".encode("cp1252"), "“quoted” – 5 €"),
    ("gb2312", "中文 — 镕".encode("gbk"), "中文 — 镕"),
    ("ks_c_5601-1987", "한국어 텍스트".encode("cp949"), "한국어 텍스트"),
    # Known labels keep working.
    ("iso-2022-jp", "日本語のテキスト".encode("iso-2022-jp"), "日本語のテキスト"),
    ("koi8-r", "Привет, мир".encode("koi8-r"), "Привет, мир"),
    ("windows-1252", "naïve “text”".encode("cp1252"), "naïve “text”"),
])
def test_charset_labels_of_real_mail_are_read(client, world, make_message, charset, payload,
                                              expected):
    message = make_message(raw=text_part(charset, payload))
    client.force_login(world.alice)

    body = shown_body(client.get(detail(message)))

    assert expected in body
    assert "\ufffd" not in body and "<U+" not in body


@pytest.mark.parametrize("charset_header,payload", [
    # No charset at all (the default is us-ascii) and 8-bit UTF-8 text.
    ("", "Grüße aus Köln".encode()),
    # Declared us-ascii, but the text is UTF-8 all the same.
    ("; charset=us-ascii", "Grüße aus Köln".encode()),
    # Declared us-ascii, the text in Windows-1252.
    ("; charset=us-ascii", "Grüße aus Köln".encode("cp1252")),
])
def test_undeclared_eight_bit_text_is_read(charset_header, payload):
    raw = (
        b"From: a@remote.example\nSubject: x\nMIME-Version: 1.0\n"
        b"Content-Type: text/plain" + charset_header.encode() + b"\n\n" + payload + b"\n"
    )

    assert render_message(raw).body.strip() == "Grüße aus Köln"


def test_explicit_utf8_with_invalid_bytes_is_still_replaced_not_guessed():
    raw = text_part("utf-8", b"caf\xc3\xa9 and \xe9")

    assert render_message(raw).body.strip() == "café and \ufffd"


def test_format_flowed_text_is_shown_as_its_paragraphs(client, world, make_message):
    """RFC 3676: a line ending in a space continues on the next one; a leading space was
    added for transport (space-stuffing); quoted lines are joined only with lines of the
    same quote depth; "-- " stays a signature separator."""
    payload = (
        b"This is a long paragraph that the \n"
        b"sender's client wrapped for \n"
        b"transport.\n"
        b"\n"
        b"> A quoted line that \n"
        b"> goes on.\n"
        b">> Deeper \n"
        b">> quote.\n"
        b" From the space-stuffed line.\n"
        b"-- \n"
        b"Signature\n"
    )
    message = make_message(raw=text_part("utf-8", payload, extra="; format=flowed"))
    client.force_login(world.alice)

    body = shown_body(client.get(detail(message)))

    assert body.rstrip("\n").splitlines() == [
        "This is a long paragraph that the sender's client wrapped for transport.",
        "",
        "> A quoted line that goes on.",
        ">> Deeper quote.",
        "From the space-stuffed line.",
        "-- ",
        "Signature",
    ]


def test_format_flowed_with_delsp_joins_without_the_space():
    raw = text_part("utf-8", b"Supercalifragi \nlisticexpialidocious.\n",
                    extra="; format=flowed; delsp=yes")

    assert render_message(raw).body.strip() == "Supercalifragilisticexpialidocious."


def test_fixed_text_keeps_its_trailing_spaces_and_line_breaks():
    raw = text_part("utf-8", b"line one \nline two")

    assert render_message(raw).body == "line one \nline two\n"


def test_an_attached_message_is_listed_with_its_own_size(client, world, make_message):
    """A forwarded message (message/rfc822) is listed with the size of that message."""
    inner = (
        b"From: x@remote.example\nSubject: inner\n\n" + b"x" * 5000 + b"\n"
    )
    raw = (
        b"From: Sender <sender@remote.example>\nTo: alice@example.test\nSubject: fwd\n"
        b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n\n"
        b"--B\nContent-Type: text/plain\n\nsee the attached message\n"
        b"--B\nContent-Type: message/rfc822\n"
        b"Content-Disposition: attachment; filename=\"forwarded.eml\"\n\n"
        + inner + b"--B--\n"
    )

    rendered = render_message(raw)

    assert [(a.name, a.content_type) for a in rendered.attachments] == [
        ("forwarded.eml", "message/rfc822")
    ]
    assert abs(rendered.attachments[0].size - len(inner)) <= 2

    message = make_message(raw=raw)
    client.force_login(world.alice)
    page = client.get(detail(message)).content.decode()
    assert 'data-label="Size">4.9\xa0KB</td>' in page


# --- The list -----------------------------------------------------------------------------


def test_an_older_page_emptied_by_a_delete_says_so_and_links_to_the_newest(
    client, world, make_message, settings
):
    """Deleting the only row of the last page brings the user back to that page, now empty:
    it says there are no older messages (not that there are none at all) and links to the
    newest ones."""
    settings.QUARANTINE_PAGE_SIZE = 5
    for _ in range(6):
        make_message()
    client.force_login(world.alice)
    first = client.get(LIST).content.decode()
    older = re.search(r'href="\?([^"]+)" id="older"', first).group(1).replace("&amp;", "&")
    here = f"{LIST}?{older}"
    [last] = mail_ids(client.get(here))

    response = client.post(reverse("quarantine:delete", args=[last]), {"next": here},
                           follow=True)

    assert response.redirect_chain == [(here, 302)]
    page = response.content.decode()
    assert mail_ids(response) == []
    assert "No messages." not in page
    assert "No older messages." in page
    assert 'id="newest"' in page


def test_the_list_is_sorted_by_quarantine_time_whatever_the_date_header_says(
    client, world, make_message
):
    """A message's Date header is the sender's to write (missing, invalid, or years off):
    the list orders and dates rows by when the message was quarantined."""
    from datetime import UTC, datetime

    no_date = b"From: a@remote.example\nTo: alice@example.test\nSubject: no date\n\nx\n"
    bad_date = no_date.replace(b"Subject: no date", b"Date: yesterday-ish\nSubject: bad date")
    old_date = no_date.replace(b"Subject: no date",
                               b"Date: Fri, 01 Jan 1999 00:00:00 +0000\nSubject: old date")
    newest = make_message(raw=old_date, received_at=datetime(2026, 11, 3, 9, 0, tzinfo=UTC))
    middle = make_message(raw=no_date, received_at=datetime(2026, 11, 2, 9, 0, tzinfo=UTC))
    oldest = make_message(raw=bad_date, received_at=datetime(2026, 11, 1, 9, 0, tzinfo=UTC))
    client.force_login(world.alice)

    response = client.get(LIST)

    assert mail_ids(response) == [newest.mail_id, middle.mail_id, oldest.mail_id]
    assert re.findall(r'data-label="Date">([^<]*)', response.content.decode()) == [
        "2026-11-03 09:00 UTC", "2026-11-02 09:00 UTC", "2026-11-01 09:00 UTC"
    ]
    page = client.get(detail(middle)).content.decode()
    assert "<dt>Date</dt>" not in page
    assert "<dt>Received</dt><dd>2026-11-02 09:00:00 UTC</dd>" in page


def test_mail_arriving_between_two_pages_neither_repeats_nor_skips_a_row(
    client, world, make_message, settings
):
    settings.QUARANTINE_PAGE_SIZE = 5
    made = [make_message() for _ in range(8)]
    client.force_login(world.alice)
    first = client.get(LIST)
    older = re.search(r'href="\?([^"]+)" id="older"', first.content.decode()).group(1)

    arrived = make_message()
    second = client.get(f"{LIST}?{older.replace('&amp;', '&')}")

    seen = mail_ids(first) + mail_ids(second)
    assert sorted(seen) == sorted(m.mail_id for m in made)
    assert len(set(seen)) == len(seen)
    assert mail_ids(client.get(LIST))[0] == arrived.mail_id


# --- Error pages --------------------------------------------------------------------------


@pytest.fixture
def page_client(client):
    client.raise_request_exception = False
    return client


def test_forbidden_page_is_the_sites_own(page_client, world):
    """A user who opens a vadmin page gets the site's page (layout, navigation, a way back),
    not the framework's bare one."""
    page_client.force_login(world.alice)

    response = page_client.get(reverse("directory:console"))

    assert response.status_code == 403
    page = response.content.decode()
    assert '<link rel="stylesheet"' in page
    assert "<h1>Forbidden</h1>" in page
    assert "Back to the message list" in page
    assert "alice" in page  # the navigation shows who is logged in


def test_bad_request_page_is_the_sites_own(page_client, world, settings):
    settings.ALLOWED_HOSTS = ["viewer.example.test"]

    response = page_client.get(LIST, HTTP_HOST="other.example.test")

    assert response.status_code == 400
    page = response.content.decode()
    assert "<h1>Bad request</h1>" in page
    assert "other.example.test" not in page


def test_a_refused_download_answers_with_the_sites_page_saying_why(client, world,
                                                                  make_message):
    message = make_message(category="VIRUS")
    client.force_login(world.alice)

    response = client.get(reverse("quarantine:download", args=[message.mail_id]))

    assert response.status_code == 403
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    assert '<link rel="stylesheet"' in page
    assert "Messages of this kind cannot be downloaded." in page
    assert "Back to the message list" in page


def test_downloading_a_message_whose_file_is_gone_says_so(client, world, make_message):
    """The list still shows the message (its row is there until the next index run): the
    download answers 404 with the reason, not a bare "Not found"."""
    import os

    from quarantine.models import AuditEvent
    from quarantine.store import get_store

    message = make_message()
    os.unlink(get_store(message.origin).path(message.storage_key))
    client.force_login(world.alice)

    response = client.get(reverse("quarantine:download", args=[message.mail_id]))

    assert response.status_code == 404
    page = response.content.decode()
    assert "The stored message cannot be read" in page
    assert '<link rel="stylesheet"' in page
    assert not AuditEvent.objects.filter(action="download").exists()


def test_expired_form_page_explains_what_to_do(world, make_message):
    """A form posted without a valid CSRF token (a page left open across a login, cookies
    cleared) gets the site's page saying how to go on, and nothing is done."""
    message = make_message()
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.alice)

    response = client.post(reverse("quarantine:delete", args=[message.mail_id]))

    assert response.status_code == 403
    page = response.content.decode()
    assert '<link rel="stylesheet"' in page
    assert "reload" in page.lower()
    assert "CSRF" not in page
    assert mail_ids(client.get(LIST)) == [message.mail_id]


# --- Search on SQLite (the embedded default) ---------------------------------------------

_SQLITE_SEARCH = r"""
import json, os, re
from datetime import UTC, datetime
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from django.test.utils import override_settings
from directory.models import Address
from quarantine.models import Message, Recipient

alice = User.objects.create_user("alice", "", "x")
Address.objects.create(address="alice@example.test", user=alice)
when = datetime(2026, 11, 20, tzinfo=UTC)
for n, subject in enumerate(json.loads(os.environ["SEARCH_SUBJECTS"])):
    message = Message.objects.create(
        mail_id=f"sqlitetest{n:02d}", category="SPAM", subject=subject,
        from_header="Sender <sender@remote.example>", received_at=when,
        origin="/nonexistent", storage_key=f"s/spam-sqlitetest{n:02d}")
    Recipient.objects.create(message=message, address="alice@example.test",
                             received_at=when, category="SPAM")
storages = {**settings.STORAGES, "staticfiles": {
    "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
found = {}
with override_settings(ALLOWED_HOSTS=["testserver"], STORAGES=storages):
    client = Client()
    client.force_login(alice)
    for q in json.loads(os.environ["SEARCH_QUERIES"]):
        page = client.get("/", {"q": q}).content.decode()
        found[q] = sorted(set(re.findall(r'<tr id="row-([^"]+)"', page)))
print(json.dumps(found))
"""


def test_search_ignores_the_case_of_non_ascii_letters_on_sqlite(tmp_path):
    """With the embedded default database (SQLite, whose LIKE folds ASCII letters only),
    "müller" finds "Herr Müller" as it does on PostgreSQL, and LIKE's wildcards stay
    literal."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "SPAMVIEWER_VAR_DIR": str(tmp_path),
        "SPAMVIEWER_IGNORE_DOTENV": "1",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    manage = [sys.executable, "manage.py"]
    migrated = subprocess.run([*manage, "migrate", "--noinput", "-v0"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=120)
    assert migrated.returncode == 0, migrated.stderr
    subjects = ["Herr Müller", "ÄRGER im Büro", "100% Rabatt", "100 Rabatt", "plain"]
    queries = ["müller", "MÜLLER", "ärger im büro", "100%", "PLAIN", "Äö"]
    env["SEARCH_SUBJECTS"], env["SEARCH_QUERIES"] = json.dumps(subjects), json.dumps(queries)
    done = subprocess.run([*manage, "shell", "-c", _SQLITE_SEARCH], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    found = json.loads(done.stdout.strip().splitlines()[-1])

    assert found == {
        "müller": ["sqlitetest00"],
        "MÜLLER": ["sqlitetest00"],
        "ärger im büro": ["sqlitetest01"],
        "100%": ["sqlitetest02"],
        "PLAIN": ["sqlitetest04"],
        "Äö": [],
    }
